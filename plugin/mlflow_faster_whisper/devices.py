"""Where a model runs: the device, a compute type it can run, and the cuBLAS CTranslate2 needs.

CTranslate2's Linux wheels link the CUDA runtime statically and open cuBLAS 12 at run time by
soname (``libcublas.so.12``); a host with only CUDA 13 (or no toolkit) has none, and the first
CUDA model then fails. The ``gpu`` extra installs NVIDIA's ``nvidia-cublas-cu12`` wheel;
``load_cublas`` loads its libraries by absolute path with ``RTLD_GLOBAL`` before the first CUDA
model is made, so CTranslate2's own ``dlopen`` by soname finds them already loaded: no
``LD_LIBRARY_PATH`` to set before Python starts. A cuBLAS 12 already on the loader path wins.

Every outcome is decided at load (``place``), never on the first request.

``LoadOptions`` is how a model is loaded, everywhere (``load_model``, the pyfunc's
``model_config``, ``evaluate``, the CLI, the service): one policy, so that an evaluation measures
what serving runs. The compute type is the stored quantization unless one is asked for; where the
device cannot run it, the nearest type it can run (``place``, which logs what it did).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mlflow_faster_whisper import compute_types
from mlflow_faster_whisper.errors import DeviceError, LoadOptionsError

_logger = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# Lt first: libcublas.so.12 needs it, and the wheel's copy must be the one it binds to.
CUBLAS_LIBRARIES = ("libcublasLt.so.12", "libcublas.so.12")
GPU_EXTRA_HINT = "pip install 'mlflow-faster-whisper[gpu]' (it brings nvidia-cublas-cu12)"


@dataclass(frozen=True)
class Cublas:
    """Where cuBLAS 12 was found: ``source`` "system" (the loader path) or "wheel", or why not."""

    found: bool
    source: Optional[str] = None
    path: Optional[str] = None
    detail: str = ""


@functools.lru_cache(maxsize=1)
def load_cublas() -> Cublas:
    """Make cuBLAS 12 loadable by soname in this process (once; later calls return the answer)."""
    if not sys.platform.startswith("linux"):
        return Cublas(False, detail=f"not looked for on {sys.platform}: CTranslate2 finds its own libraries there")
    try:
        ctypes.CDLL(CUBLAS_LIBRARIES[1], mode=ctypes.RTLD_GLOBAL)
        return Cublas(True, source="system", path=_loaded_from(CUBLAS_LIBRARIES[1]))
    except OSError:
        pass
    lib_dir = _wheel_lib_dir()
    if lib_dir is None:
        return Cublas(False, detail=f"{CUBLAS_LIBRARIES[1]} is not on the loader path and the nvidia-cublas-cu12 wheel is not installed")
    for name in CUBLAS_LIBRARIES:
        try:
            ctypes.CDLL(str(lib_dir / name), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            return Cublas(False, path=str(lib_dir), detail=f"{lib_dir / name} could not be loaded: {exc}")
    _logger.info("Loaded cuBLAS 12 from the nvidia-cublas-cu12 wheel: %s", lib_dir)
    return Cublas(True, source="wheel", path=str(lib_dir))


def _wheel_lib_dir() -> Optional[Path]:
    # Looked up by path: ``nvidia`` is a namespace package (its ``__file__`` is None), and
    # importing it is not needed to find files.
    for entry in sys.path:
        lib_dir = Path(entry or ".") / "nvidia" / "cublas" / "lib"
        if (lib_dir / CUBLAS_LIBRARIES[1]).is_file():
            return lib_dir
    return None


def _loaded_from(soname: str) -> Optional[str]:
    """The directory this process mapped ``soname`` from (Linux's /proc/self/maps)."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if path.endswith("/" + soname) or f"/{soname}." in path:
                return str(Path(path).parent)
    except OSError:
        pass
    return None


COMPUTE_TYPES = ("default", "auto", *compute_types.NAMES)


class LoadOptions(BaseModel):
    """How a model is loaded: the device, the compute type, CTranslate2's threads and workers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when a GPU and cuBLAS 12 are there, else the CPU.")
    compute_type: str = Field("default", description="A CTranslate2 compute type; default: the stored quantization (as registered).")
    cpu_threads: int = Field(0, ge=0, le=1024, description="CTranslate2 intra-op threads (0: its default).")
    num_workers: int = Field(1, ge=1, le=64, description="Parallel CTranslate2 workers (concurrent decodes).")

    @field_validator("compute_type")
    @classmethod
    def _known_compute_type(cls, value: str) -> str:
        if value not in COMPUTE_TYPES:
            raise ValueError(f"unknown compute_type {value!r}; use one of {', '.join(COMPUTE_TYPES)}")
        return value

    @classmethod
    def parse(cls, value: LoadOptions | Mapping[str, Any] | None = None) -> LoadOptions:
        """Validate options given as an object, a mapping (None values mean the default) or None.

        Raises:
            LoadOptionsError: an unknown option or a bad value, naming the field.
        """
        if isinstance(value, LoadOptions):
            return value
        given = {k: v for k, v in (value or {}).items() if v is not None}
        unknown = [k for k in given if k not in cls.model_fields]
        if unknown:
            raise LoadOptionsError(f"Unknown load option {unknown[0]!r}; valid options: {', '.join(cls.model_fields)}.", field=unknown[0])
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else None
            raise LoadOptionsError(f"Invalid load option {field}: {first['msg']}.", field=field) from None

    def place(self, quantization: Optional[str]) -> Placement:
        """Where and in which compute type a model stored in ``quantization`` runs with these options."""
        return place(self.device, self.compute_type, quantization)


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs: the device and the compute type it can run there."""

    device: str
    compute_type: str
    requested_compute_type: str


def place(device: str = "auto", compute_type: str = "default", quantization: Optional[str] = None) -> Placement:
    """Resolve the device and a compute type it supports, before any model is made.

    Args:
        device: "auto" (CUDA when a GPU and cuBLAS 12 are there, else CPU), "cpu" or "cuda".
        compute_type: a CTranslate2 compute type; "default" is the stored quantization.
        quantization: the stored quantization (what "default" means; unknown: CTranslate2 decides).

    Raises:
        DeviceError: ``device="cuda"`` with no visible GPU or no cuBLAS 12, or an unknown device.
    """
    import ctranslate2

    if device not in DEVICES:
        raise DeviceError(f"Unknown device {device!r}: use one of {', '.join(DEVICES)}.")
    if device != "cpu":
        gpus = ctranslate2.get_cuda_device_count()
        reason = _cuda_unusable(gpus)
        if reason is None:
            device = "cuda"
        elif device == "cuda":
            raise DeviceError(f"device='cuda' cannot be used: {reason}. Fix that, or load with device='cpu'.")
        else:
            if gpus:  # a GPU is there but cannot be used: say why (no GPU at all is no news)
                _logger.warning("device='auto' falls back to CPU: %s", reason)
            device = "cpu"
    supported = set(ctranslate2.get_supported_compute_types(device))
    stored = quantization if compute_type == "default" and compute_types.get(quantization) is not None else None
    as_stored = stored is not None
    requested = stored or compute_type
    chosen = requested
    if requested not in supported and requested not in ("default", "auto"):
        row = compute_types.get(requested)
        chosen = next((t for t in (row.fallbacks if row else ()) if t in supported), "default")
        (_logger.info if as_stored else _logger.warning)(
            "compute_type %r%s is not supported on %s (supported: %s); using %r instead",
            requested,
            " (as stored)" if as_stored else "",
            device,
            ", ".join(sorted(supported)),
            chosen,
        )
    return Placement(device=device, compute_type=chosen, requested_compute_type=requested)


def _cuda_unusable(gpus: int) -> Optional[str]:
    if gpus == 0:
        return "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    cublas = load_cublas()
    if not cublas.found:
        return f"cuBLAS 12, which CTranslate2 needs on a GPU, was not found ({cublas.detail}); {GPU_EXTRA_HINT}"
    return None


def runtime_facts() -> dict[str, Any]:
    """What this process can run on: GPUs, driver, compute types, cuBLAS, library versions."""
    import ctranslate2
    import faster_whisper

    gpus = ctranslate2.get_cuda_device_count()
    driver, names = _nvml()
    cublas = load_cublas() if gpus else Cublas(False, detail="not looked for: no CUDA GPU is visible")
    return {
        "ctranslate2": ctranslate2.__version__,
        "faster_whisper": faster_whisper.__version__,
        "python": sys.version.split()[0],
        "cuda_device_count": gpus,
        "driver": driver,
        "devices": [{"device": "cpu", "compute_types": sorted(ctranslate2.get_supported_compute_types("cpu"))}]
        + [
            {
                "device": f"cuda:{index}",
                "name": names[index] if index < len(names) else None,
                "compute_types": sorted(ctranslate2.get_supported_compute_types("cuda", index)),
            }
            for index in range(gpus)
        ],
        "cublas": asdict(cublas),
    }


@contextlib.contextmanager
def _nvml_session() -> Iterator[Optional[ctypes.CDLL]]:
    """NVIDIA's management library, initialised, or None where the driver has none."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        yield None
        return
    if nvml.nvmlInit_v2() != 0:
        yield None
        return
    try:
        yield nvml
    finally:
        nvml.nvmlShutdown()


def gpu_memory_bytes(index: int = 0) -> Optional[tuple[int, int]]:
    """(total, in use by all processes) bytes of GPU ``index``, from NVML; None without an NVIDIA driver."""

    class Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    with _nvml_session() as nvml:
        if nvml is None:
            return None
        handle, memory = ctypes.c_void_p(), Memory()
        if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) or nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)):
            return None
        return int(memory.total), int(memory.used)


def gpu_memory_used_mib(index: int = 0) -> Optional[float]:
    """Memory in use on GPU ``index`` (all processes); None without an NVIDIA driver."""
    memory = gpu_memory_bytes(index)
    return None if memory is None else memory[1] / 2**20


def _nvml() -> tuple[Optional[str], list[str]]:
    """(driver version, GPU names) from NVIDIA's management library, where the driver has it."""
    with _nvml_session() as nvml:
        if nvml is None:
            return None, []
        buffer = ctypes.create_string_buffer(96)
        driver = buffer.value.decode() if nvml.nvmlSystemGetDriverVersion(buffer, 96) == 0 else None
        count, names = ctypes.c_uint(0), []
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0:
            for index in range(count.value):
                handle = ctypes.c_void_p()
                if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) == 0 and nvml.nvmlDeviceGetName(handle, buffer, 96) == 0:
                    names.append(buffer.value.decode())
        return driver, names
