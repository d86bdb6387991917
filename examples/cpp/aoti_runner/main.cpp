// aoti_runner: run a psp-engine AOTInductor package (.pt2) from C++, no Python.
//
// Source: PyTorch 2.13 AOTInductor C++ API, torch::inductor::AOTIModelPackageLoader
// (torch/csrc/inductor/aoti_package/model_package_loader.h). The package comes from
// `python -m export.aoti` (export/aoti.py), which stores the input and output names in the
// package metadata (`input_names`, `output_names`, comma-separated).
//
// usage: aoti_runner MODEL.pt2 INPUT.bin SHAPE OUT_DIR [--runs N]
//   INPUT.bin  raw little-endian float32, C order, exactly prod(SHAPE) values
//              (part psp: x [B, input_nc, 256, 256] in [-1, 1]; part generator: w_plus [B, n_styles, 512])
//   SHAPE      comma-separated dims, e.g. 2,3,256,256
//   OUT_DIR    each output is written there as <name>.bin, raw little-endian float32, C order
//   --runs N   also time N runs after one warm-up run and print the median in ms
//
// Prints one line per output: `<name> [d0, d1, ...] -> OUT_DIR/<name>.bin`.
// Exit codes: 0 ok, 2 usage or input error, 1 the model failed to load or run.
// AOTI_RUNTIME_CHECK_INPUTS=1 is set (unless already set) so a wrong input shape is refused by
// the package instead of being read out of bounds.

// Only the headers this file uses: <ATen/ATen.h> (every operator) would double the build time, and
// <ATen/ops/empty.h> (at::empty, which pulls in ATen/Context.h) a third more (11.8 -> 15.7 CPU-s,
// measured); the input is allocated with at::detail::empty_cpu, the function at::empty's CPU kernel calls.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "aoti_runner reads and writes little-endian float32; build it on a little-endian host"
#endif

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) {
    if (!item.empty()) parts.push_back(item);
  }
  return parts;
}

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  for (const auto& part : split(text, ',')) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(part, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != part.size() || v < 1) {
      throw UsageError("SHAPE '" + text + "': expected positive comma-separated integers, e.g. 2,3,256,256");
    }
    shape.push_back(v);
  }
  if (shape.empty()) throw UsageError("SHAPE is empty: expected e.g. 2,3,256,256");
  return shape;
}

std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// [*shape] float32 from a raw little-endian file holding exactly prod(shape) values.
at::Tensor read_raw_f32(const std::string& path, const std::vector<int64_t>& shape) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw UsageError(path + ": cannot open the input file");
  const auto bytes = static_cast<int64_t>(f.tellg());
  at::Tensor x = at::detail::empty_cpu(shape, at::kFloat);
  const int64_t want = x.numel() * static_cast<int64_t>(sizeof(float));
  if (bytes != want) {
    throw UsageError(path + ": " + std::to_string(bytes) + " bytes, but shape " + shape_str(x.sizes()) +
                     " needs " + std::to_string(want) + " (raw float32); check SHAPE");
  }
  f.seekg(0);
  f.read(reinterpret_cast<char*>(x.data_ptr<float>()), want);
  if (!f) throw UsageError(path + ": read failed");
  return x;
}

void write_raw_f32(const std::filesystem::path& path, const at::Tensor& t) {
  at::Tensor c = t.to(at::kFloat).contiguous();
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(c.data_ptr<float>()), c.numel() * static_cast<int64_t>(sizeof(float)));
  if (!f) throw std::runtime_error(path.string() + ": write failed");
}

int usage(const char* argv0) {
  std::cerr << "usage: " << argv0 << " MODEL.pt2 INPUT.bin SHAPE OUT_DIR [--runs N]\n"
            << "  INPUT.bin raw little-endian float32 of SHAPE (comma-separated, e.g. 2,3,256,256);\n"
            << "  each output is written to OUT_DIR/<name>.bin as raw float32\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5 && argc != 7) return usage(argv[0]);
  int runs = 0;
  if (argc == 7) {
    if (std::string(argv[5]) != "--runs") return usage(argv[0]);
    runs = std::atoi(argv[6]);
    if (runs < 1) {
      std::cerr << "error: --runs needs a positive integer, got '" << argv[6] << "'\n";
      return 2;
    }
  }
  const std::string model_path = argv[1], input_path = argv[2];
  const std::filesystem::path out_dir = argv[4];
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);

  at::Tensor x;
  try {
    x = read_raw_f32(input_path, parse_shape(argv[3]));
    std::filesystem::create_directories(out_dir);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }

  try {
    c10::InferenceMode inference_mode;
    if (!std::filesystem::is_regular_file(model_path)) {
      std::cerr << "error: " << model_path << ": no such package; build it with python -m export.aoti\n";
      return 2;
    }
    torch::inductor::AOTIModelPackageLoader loader(model_path);
    auto metadata = loader.get_metadata();
    std::vector<at::Tensor> outputs = loader.run({x});

    std::vector<std::string> names = split(metadata.count("output_names") ? metadata["output_names"] : "", ',');
    for (size_t i = names.size(); i < outputs.size(); ++i) names.push_back("output_" + std::to_string(i));
    for (size_t i = 0; i < outputs.size(); ++i) {
      const auto path = out_dir / (names[i] + ".bin");
      write_raw_f32(path, outputs[i]);
      std::cout << names[i] << " " << shape_str(outputs[i].sizes()) << " -> " << path.string() << "\n";
    }

    if (runs > 0) {  // the run above was the warm-up
      std::vector<double> ms;
      for (int r = 0; r < runs; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        auto out = loader.run({x});
        const auto t1 = std::chrono::steady_clock::now();
        ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      }
      std::sort(ms.begin(), ms.end());
      const double median = ms[ms.size() / 2];
      std::printf("median %.2f ms per run over %d runs (batch %lld: %.2f img/s); warm-up excluded\n", median, runs,
                  static_cast<long long>(x.size(0)), 1000.0 * x.size(0) / median);
    }
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
