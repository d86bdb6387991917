"""The Ray instance this project starts itself (`engine.run --ray local`, `python -m engine.serve`):
reachable from this machine only, token-authenticated, its files in a private folder.

Source: Ray 2.60's own code, read in `ray/_private/worker.py` (`init`), `ray/_private/services.py`
(`resolve_ip_for_localhost`, `get_node_ip_address`), `ray/_private/node.py` and
`ray/_private/authentication/authentication_token_setup.py`:

- **Loopback.** Every server of a Ray node (GCS, raylet, object manager, core workers, the dashboard
  and runtime-env agents, the metrics exporters) binds the node's IP address; `ray.init` turns
  "127.0.0.1" into the host's network address unless Ray believes clusters are off
  (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read into `ray._private.ray_constants.ENABLE_RAY_CLUSTER`
  when ray is imported). `start_local_ray` sets both for the `ray.init` call (ray may be imported
  already: `engine.serve` imports it at the top), so the node's IP address is 127.0.0.1, and puts the
  constant back afterwards. The dashboard is off (`include_dashboard=False`); what Ray still starts
  of it (its agents, the metrics head) binds the loopback too. Tested by listing the listening
  sockets of the whole process tree (`tests/test_ray_loopback.py`). Ray Serve binds each replica's
  inter-deployment gRPC server to "[::]:0" in code, out of reach of any option: the deployment
  calls `loopback_replica_grpc` in its constructor, which binds it to 127.0.0.1 instead.
- **Token authentication on.** `RAY_AUTH_MODE=token` (whatever the environment said), the token
  read from `RAY_AUTH_TOKEN_PATH` = `<private>/auth_token` (made once, 0600, 256 random bits, as
  `ray get-auth-token --generate` makes it), never `~/.ray/auth_token`; `RAY_AUTH_TOKEN` is
  dropped from this process's environment so that it cannot override the file.
- **Files.** Ray's temp root (sessions, logs, unix sockets, spilled objects) is `<private>/tmp`
  (Ray makes that folder 0777; the 0700 folder above it keeps others out).

`<private>` is `reference.plumbing.files.cache_dir() / "ray"`, or `/tmp/psp-engine-ray-<uid>` when that
path is too long for Ray's unix sockets (AF_UNIX: 107 bytes); either is made 0700 and must be a
folder of this user (not a link). The environment variables stay set in this process after the
call: Ray's processes and the workers it starts later inherit them, and a subprocess that joins this
instance (`--ray <its address>`) needs the token.

`--ray ADDRESS` (a cluster the user started with `ray start`) joins with `join_ray`: that
cluster's binding and token are the user's (README, "a real multi-host cluster, safely"); only a
loopback address (127.0.0.1, localhost, ::1) is kept as given, where Ray would dial the host's
network address instead and miss a cluster that listens on the loopback (such as this module's).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

from reference.plumbing.errors import UsageError
from reference.plumbing.files import cache_dir, temp_path

FOLDER_NAME = "ray"  # under the engine's cache folder
TOKEN_NAME = "auth_token"
TEMP_NAME = "tmp"  # Ray's temp root, inside the private folder
FALLBACK_PARENT = Path("/tmp")
AF_UNIX_MAX = 107  # bytes of a unix socket's path on Linux (108 with the NUL), as Ray checks it
# What Ray appends to its temp root for its longest socket path:
# "/session_2026-12-07_18-34-27_565354_<pid up to 7 digits>/sockets/plasma_store" and a ".N" suffix.
SOCKET_TAIL = len("/session_2026-12-07_18-34-27_565354_4194304/sockets/plasma_store.99")
LOOPBACK = "127.0.0.1"
AUTH_ENV = {"mode": "RAY_AUTH_MODE", "path": "RAY_AUTH_TOKEN_PATH", "token": "RAY_AUTH_TOKEN"}
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def private_folder() -> Path:
    """The private folder of the local Ray instance (created 0700 if missing).

    `cache_dir() / "ray"`, or `/tmp/psp-engine-ray-<uid>` when Ray's socket paths under the first
    (`<folder>/tmp/session_.../sockets/plasma_store`) would pass `AF_UNIX_MAX` bytes.

    Raises:
        UsageError: the folder is a link, not a folder, or another user's; or it cannot be made.
    """
    folder = cache_dir() / FOLDER_NAME
    if len(os.fsencode(folder / TEMP_NAME)) + SOCKET_TAIL > AF_UNIX_MAX:
        folder = FALLBACK_PARENT / f"psp-engine-ray-{os.getuid()}"
    return _make_private(folder)


def _make_private(folder: Path) -> Path:
    """`folder`, made (parents too) and checked: a real folder of this user, mode 0700."""
    fix = f"remove it, or set PSP_ENGINE_CACHE to a folder of yours (it holds Ray's files in {FOLDER_NAME}/)"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        st = os.lstat(folder)
    except OSError as e:
        raise UsageError(f"{folder}: cannot make the local Ray instance's folder ({e.strerror}); {fix}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{folder}: is not a folder (a link or a file) and would hold Ray's token; {fix}")
    if st.st_uid != os.getuid():
        raise UsageError(f"{folder}: belongs to user id {st.st_uid}, not to you, and would hold Ray's token; {fix}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(folder, 0o700)
    return folder


def auth_token(folder: Path) -> Path:
    """The token file `<folder>/auth_token` (0600), made once with 256 random bits in hex (as Ray's
    `generate_new_authentication_token`), then reused; made by a hard link of a complete temp file,
    so a concurrent start never reads half a token nor replaces one in use.

    Raises:
        UsageError: the file is empty, a link, or another user's (remove it: it is made again).
    """
    path = folder / TOKEN_NAME
    if not os.path.lexists(path):
        tmp = temp_path(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size == 0:
        raise UsageError(f"{path}: not a token file of yours (a link, another user's, or empty); remove it "
                         "and run again (a new token is made)")
    if stat.S_IMODE(st.st_mode) != 0o600:
        os.chmod(path, 0o600)
    return path


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """For the `with` block, Ray resolves "127.0.0.1" to itself instead of to the host's network
    address (module docstring); the constant is put back at the end (the environment variable stays,
    for the processes Ray started)."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def _keep_sigterm() -> Iterator[None]:
    """Keep this process's SIGTERM handler across `ray.init`.

    `ray.init` installs the core worker's failure-signal handler for SIGTERM (it prints a stack and
    kills the process at once), over the handler our CLIs install (`reference.plumbing.cli.run_cli`:
    SIGTERM as Ctrl-C). Killed that way, a driver neither shuts Ray down nor closes its manifest,
    and Ray's agents outlived it (seen with `engine.serve`). Put back, `kill` stops the service or
    the run as Ctrl-C does. Main thread only (where Python handles signals)."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)


def start_local_ray(num_cpus: int, log_to_driver: bool = True, system_config: dict | None = None) -> Path:
    """Start a Ray instance in this process that only this machine can reach (module docstring).

    `ray.init(address="local", ...)`: always a new instance (never one found through `RAY_ADDRESS`
    or a `ray start` of this machine), node IP 127.0.0.1, no dashboard, token authentication with
    the token in the private folder, Ray's temp root in it. `ray.shutdown()` is the caller's.

    Args:
        num_cpus: CPUs Ray may schedule on.
        log_to_driver: print the workers' output in this process (`ray.init`'s argument).
        system_config: Ray's `_system_config` (tests: `num_workers_soft_limit`), or None.

    Returns:
        The private folder (0700): `auth_token` and Ray's temp root `tmp/` are in it.

    Raises:
        UsageError: the private folder or its token is not this user's (`private_folder`, `auth_token`).
        ImportError: ray is not installed.
        RuntimeError, ValueError, ConnectionError: from `ray.init`.
    """
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    folder = private_folder()
    token = auth_token(folder)
    os.environ[AUTH_ENV["mode"]] = "token"
    os.environ[AUTH_ENV["path"]] = str(token)
    os.environ.pop(AUTH_ENV["token"], None)
    Config.initialize("")  # this process reads RAY_AUTH_MODE again (Ray's `_enable_token_auth` does the same)
    AuthenticationTokenLoader.instance().reset_cache()  # and the token, if an earlier instance had another
    with _loopback_node_ip(), _keep_sigterm():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                 _temp_dir=str(folder / TEMP_NAME), _system_config=system_config)
    return folder


def loopback_replica_grpc() -> bool:
    """In a Ray Serve replica of an instance whose node IP is the loopback (`start_local_ray`'s):
    bind the replica's inter-deployment gRPC server to 127.0.0.1 instead of every interface.

    Ray Serve 2.60 binds that server to "[::]:0" in code, with no option
    (`ray/serve/_private/replica.py`, `_on_initialized`, through the name `add_port_to_grpc_server`
    it imports from `ray._common.tls_utils`); it starts after the deployment's constructor, which
    calls this. The proxy and other replicas dial it at the node's IP address, 127.0.0.1 here. On a
    cluster's node (another node IP) nothing changes. Private Ray code: a Ray upgrade that renames it
    makes this a no-op, and `tests/test_ray_loopback.py` (every socket of `engine.serve` on the
    loopback) fails.

    Returns:
        Whether the binding was changed (False: not a loopback node, or Serve's code is not as read).
    """
    import ray

    try:
        from ray.serve._private import replica
    except ImportError:  # pragma: no cover - Serve not installed
        return False
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or ray.util.get_node_ip_address() != LOOPBACK:
        return False
    if getattr(bind, "loopback", False):
        return True

    def bind_loopback(server, address: str):
        return bind(server, LOOPBACK + address[4:] if address.startswith("[::]:") else address)

    bind_loopback.loopback = True
    replica.add_port_to_grpc_server = bind_loopback
    return True


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address `host:port` (or `[v6]:port`) names this machine's loopback
    (127.0.0.0/8, ::1, "localhost"); False for "auto", `ray://...` and other hosts."""
    if "://" in address or ":" not in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def join_ray(address: str, log_to_driver: bool = True) -> None:
    """Connect this process to a running Ray cluster: `ray.init(address=address)`.

    The cluster's binding and authentication are its owner's: with token authentication on, this
    process needs `RAY_AUTH_MODE=token` and the token (`RAY_AUTH_TOKEN_PATH` or `RAY_AUTH_TOKEN`),
    as Ray documents. A loopback `address` (`is_loopback_address`) is dialled as given and this
    driver's node address is 127.0.0.1 (module docstring), so a cluster listening only on the
    loopback is reached.

    Args:
        address: "auto", "host:port" (the GCS) or "ray://host:10001" (Ray Client).
        log_to_driver: `ray.init`'s argument.

    Raises:
        ImportError: ray is not installed.
        ConnectionError, RuntimeError, ValueError: from `ray.init` (no cluster there, no token).
    """
    import ray

    with _keep_sigterm():
        if is_loopback_address(address):
            with _loopback_node_ip():
                ray.init(address=address, log_to_driver=log_to_driver)
        else:
            ray.init(address=address, log_to_driver=log_to_driver)
