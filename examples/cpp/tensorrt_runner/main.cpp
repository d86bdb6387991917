// tensorrt_runner: run a psp-engine TensorRT plan from C++.
//
// Source: TensorRT C++ API (NvInferRuntime.h, TensorRT 10.x): createInferRuntime,
// IRuntime::deserializeCudaEngine, ICudaEngine::getNbIOTensors / getIOTensorName /
// getTensorIOMode / getTensorShape / getTensorDataType / getNbOptimizationProfiles /
// getProfileShape, IExecutionContext::setOptimizationProfileAsync / setInputShape /
// setTensorAddress / getTensorShape / enqueueV3; CUDA runtime cudaMalloc / cudaMemcpyAsync.
//
// Usage: tensorrt_runner model.plan input.f32 out_dir
//   model.plan  a plan from `python -m export.tensorrt` (one float32 input, e.g. psp: x
//               [B, 3, 256, 256]; generator: w_plus [B, n_styles, 512])
//   input.f32   raw little-endian float32, C order; B is the file size over one sample's size
//   out_dir     receives <output name>.f32 per output (raw float32, C order)
// Prints each output's name and shape. Exit codes: 0 ok, 1 runtime failure, 2 usage error.

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
  }
};

void check_cuda(cudaError_t err, char const* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

std::vector<char> read_file(std::string const& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::invalid_argument(path + ": cannot open");
  return std::vector<char>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

std::string shape_str(nvinfer1::Dims const& d) {
  std::ostringstream s;
  s << "[";
  for (int32_t i = 0; i < d.nbDims; ++i) s << (i ? ", " : "") << d.d[i];
  s << "]";
  return s.str();
}

int64_t volume(nvinfer1::Dims const& d, int32_t from = 0) {
  int64_t v = 1;
  for (int32_t i = from; i < d.nbDims; ++i) v *= d.d[i];
  return v;
}

// Device buffer freed on scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { check_cuda(cudaMalloc(&ptr, bytes), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(DeviceBuffer const&) = delete;
  DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};

int run(std::string const& plan_path, std::string const& input_path, std::string const& out_dir) {
  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  if (!runtime) throw std::runtime_error("createInferRuntime failed (no CUDA device?)");
  std::vector<char> plan = read_file(plan_path);
  std::unique_ptr<nvinfer1::ICudaEngine> engine(runtime->deserializeCudaEngine(plan.data(), plan.size()));
  if (!engine) throw std::runtime_error(plan_path + ": cannot deserialize (another TensorRT version or GPU?)");

  std::vector<std::string> inputs, outputs;
  for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
    char const* name = engine->getIOTensorName(i);
    if (engine->getTensorDataType(name) != nvinfer1::DataType::kFLOAT)
      throw std::runtime_error(std::string("tensor ") + name + " is not float32");
    (engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? inputs : outputs).push_back(name);
  }
  if (inputs.size() != 1) throw std::invalid_argument("this runner feeds plans with exactly one input");
  char const* in_name = inputs[0].c_str();

  // Batch size from the file size; the input shape is the engine's with dim 0 replaced.
  std::vector<char> host_in = read_file(input_path);
  nvinfer1::Dims in_shape = engine->getTensorShape(in_name);
  int64_t const sample = volume(in_shape, 1);
  int64_t const bytes_per_sample = sample * static_cast<int64_t>(sizeof(float));
  if (host_in.empty() || static_cast<int64_t>(host_in.size()) % bytes_per_sample != 0)
    throw std::invalid_argument(input_path + ": size " + std::to_string(host_in.size()) +
                                " is not a multiple of one sample (" + std::to_string(bytes_per_sample) +
                                " bytes, shape " + shape_str(in_shape) + ")");
  in_shape.d[0] = static_cast<int64_t>(host_in.size()) / bytes_per_sample;

  // The first profile whose range holds the batch.
  int32_t profile = -1;
  for (int32_t p = 0; p < engine->getNbOptimizationProfiles() && profile < 0; ++p) {
    nvinfer1::Dims lo = engine->getProfileShape(in_name, p, nvinfer1::OptProfileSelector::kMIN);
    nvinfer1::Dims hi = engine->getProfileShape(in_name, p, nvinfer1::OptProfileSelector::kMAX);
    if (lo.d[0] <= in_shape.d[0] && in_shape.d[0] <= hi.d[0]) profile = p;
  }
  if (profile < 0)
    throw std::invalid_argument("batch " + std::to_string(in_shape.d[0]) + " is in no optimisation profile");

  cudaStream_t stream;
  check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  std::unique_ptr<nvinfer1::IExecutionContext> context(engine->createExecutionContext());
  if (!context) throw std::runtime_error("createExecutionContext failed");
  if (!context->setOptimizationProfileAsync(profile, stream)) throw std::runtime_error("setOptimizationProfileAsync");
  if (!context->setInputShape(in_name, in_shape)) throw std::runtime_error("setInputShape " + shape_str(in_shape));

  DeviceBuffer d_in(host_in.size());
  check_cuda(cudaMemcpyAsync(d_in.ptr, host_in.data(), host_in.size(), cudaMemcpyHostToDevice, stream), "H2D copy");
  context->setTensorAddress(in_name, d_in.ptr);

  std::vector<std::unique_ptr<DeviceBuffer>> d_out;
  std::vector<nvinfer1::Dims> out_shapes;
  for (auto const& name : outputs) {
    nvinfer1::Dims s = context->getTensorShape(name.c_str());
    out_shapes.push_back(s);
    d_out.emplace_back(new DeviceBuffer(static_cast<size_t>(volume(s)) * sizeof(float)));
    context->setTensorAddress(name.c_str(), d_out.back()->ptr);
  }
  if (!context->enqueueV3(stream)) throw std::runtime_error("enqueueV3 failed");

  for (size_t i = 0; i < outputs.size(); ++i) {
    std::vector<float> host(static_cast<size_t>(volume(out_shapes[i])));
    check_cuda(cudaMemcpyAsync(host.data(), d_out[i]->ptr, host.size() * sizeof(float), cudaMemcpyDeviceToHost, stream),
               "D2H copy");
    check_cuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    std::string const path = out_dir + "/" + outputs[i] + ".f32";
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<char const*>(host.data()), static_cast<std::streamsize>(host.size() * sizeof(float)));
    if (!f) throw std::runtime_error(path + ": cannot write");
    std::cout << outputs[i] << ": " << shape_str(out_shapes[i]) << " -> " << path << "\n";
  }
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " model.plan input.f32 out_dir\n";
    return 2;
  }
  try {
    return run(argv[1], argv[2], argv[3]);
  } catch (std::invalid_argument const& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (std::exception const& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
