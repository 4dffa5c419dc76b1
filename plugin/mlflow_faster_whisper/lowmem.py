"""CTranslate2's Whisper conversion with one float copy of the model in memory, not two or three.

CTranslate2's ``TransformersConverter`` loads the checkpoint with ``from_pretrained``, which (with
transformers 5) keeps the weights memory-mapped: every page read counts in the process's RSS, and
int8 quantization, which scales each weight in place, copies the mapped pages on write, so a float
copy is made beside the mapping and both stay until the conversion ends (BENCHMARKS.md section 4b
compares the two peaks). Here the same
converter loads the model differently: the tensors are read one by one with plain reads into
anonymous memory, in the dtype the target needs, and assigned to a model built without weights
(``meta`` device). While CTranslate2 builds its spec, the q/k/v projections it fuses into one
tensor are freed once fused; then the model is dropped, so the spec is the only owner of each
tensor and quantizing a tensor frees its float copy; and each tensor is written to model.bin from
its own memory rather than from a copy of it. int8 weights are quantized with CTranslate2's
arithmetic a block of rows at a time, not a whole tensor at once. Everything else (the spec, the
other quantizations, the file format) is CTranslate2's own code: the model.bin written is byte for
byte the one its converter writes.

Only a local directory of ``*.safetensors`` weights is read this way; anything else (a hub id, a
``pytorch_model.bin``) goes through ``from_pretrained`` as before. An adapter's base is loaded
the same way (``load_pretrained``), merged in place, and handed to the converter as it is: never
saved and read again.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import struct
from itertools import chain
from pathlib import Path
from typing import Any, Optional

import ctranslate2
import numpy as np
import torch

from mlflow_faster_whisper import compute_types

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def weight_files(model_dir: str) -> Optional[list[Path]]:
    """The safetensors files of a local transformers checkpoint (sharded or not), else None."""
    directory = Path(model_dir)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    single = directory / "model.safetensors"
    return [single] if single.is_file() else None


def read_safetensors(path: Path, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read into its own memory (no mapping), floating tensors
    cast to ``dtype`` one at a time.

    Raises:
        ValueError: the file is not a well-formed safetensors file.
    """
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        base = 8 + header_size
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
            size = tensor.numel() * tensor.element_size()
            if size != end - begin:
                raise ValueError(f"{path}: {name} has {end - begin} bytes for shape {entry['shape']} {entry['dtype']}")
            f.seek(base + begin)
            # Straight into the tensor's memory (a numpy view would make its storage unresizable,
            # and the fused projections could then not be freed).
            if size and f.readinto(memoryview((ctypes.c_char * size).from_address(tensor.data_ptr())).cast("B")) != size:
                raise ValueError(f"{path} ends inside {name}")
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            tensors[name] = tensor
    return tensors


class Converter(ctranslate2.converters.TransformersConverter):
    """``TransformersConverter`` that loads a local safetensors checkpoint with one float copy, and
    takes the checkpoint's tokenizer already loaded (``tokenizer``) rather than loading a second.

    ``model``, when given, is converted instead of loading one (the directory then needs only its
    config.json): it is handed over, not lent. Conversion frees and overwrites its weights, so the
    caller must hold no other reference to it.
    """

    def __init__(self, *args, tokenizer: Any = None, model: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokenizer, self._model = tokenizer, model

    def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
        if self._tokenizer is not None:
            return self._tokenizer
        return super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)

    def convert(self, *args, **kwargs):
        with _one_copy_at_a_time():
            return super().convert(*args, **kwargs)

    def _load(self):
        spec = super()._load()
        gc.collect()  # the model is gone: the spec alone holds each tensor, so quantizing it frees it
        return spec

    def load_model(self, model_class, model_name_or_path, **kwargs):
        if self._model is not None:
            model, self._model = self._model, None  # handed over: the spec becomes its only owner
            return model
        model = None if self._revision else load_pretrained(model_class, model_name_or_path, kwargs["config"], kwargs.get("dtype"))
        return model if model is not None else super().load_model(model_class, model_name_or_path, **kwargs)


def load_pretrained(model_class: Any, model_dir: str, config: Any, dtype: Optional[torch.dtype] = None) -> Any:
    """``model_class.from_pretrained(model_dir)`` for a local safetensors checkpoint, with its
    weights read into the process's own memory (floating ones as ``dtype``); None for anything else.

    Raises:
        ValueError: the weights do not match the model, or a file is not well-formed.
    """
    files = weight_files(model_dir) if Path(model_dir).is_dir() else None
    if files is None:
        return None
    config._name_or_path = str(model_dir)
    with torch.device("meta"):
        model = model_class(config)
    state: dict[str, Any] = {}
    for file in files:
        state.update(read_safetensors(file, dtype))
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    unloaded = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unloaded or unexpected:
        raise ValueError(
            f"The weights in {model_dir} do not match {model_class.__name__}: missing {unloaded[:5]}, unexpected {list(unexpected)[:5]}"
        )
    _load_generation_config(model, model_dir)
    return model.eval()


def _load_generation_config(model: Any, model_dir: str) -> None:
    # What from_pretrained does: the checkpoint's generation config (language ids, suppressed
    # tokens, alignment heads), when it has one.
    from transformers import GenerationConfig

    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)


@contextlib.contextmanager
def _one_copy_at_a_time():
    """Within one conversion: free the projections CTranslate2 fuses once fused, quantize to int8 a
    block of rows at a time, and write each tensor from its own memory (CTranslate2 copies it into
    a bytes object first)."""
    from ctranslate2.converters import utils
    from ctranslate2.specs.model_spec import LayerSpec, PyTorchVariable

    fuse_linear, to_bytes, quantize = utils.fuse_linear, PyTorchVariable.to_bytes, LayerSpec._quantize

    def fuse_and_free(spec, layers):
        fuse_linear(spec, layers)
        for layer in layers:  # the model's own projections: nothing else reads them after this
            for tensor in (layer.weight, getattr(layer, "bias", None)):
                if isinstance(tensor, torch.Tensor):
                    with contextlib.suppress(RuntimeError):  # a memory-mapped tensor cannot be resized
                        tensor.untyped_storage().resize_(0)

    def tensor_bytes(self):
        return memoryview(self.tensor.reshape(-1).view(torch.uint8).numpy())

    def quantize_in_blocks(self, quantization, variable_filter=None):
        done: set[str] = set()
        row = compute_types.get(quantization)
        if row is not None and row.int8_weights:

            def int8(spec, name, value):
                key = name.rsplit("/", 1)[-1]
                if (
                    (variable_filter is None or variable_filter(name))
                    and hasattr(spec, f"{key}_scale")
                    and isinstance(value, ctranslate2.specs.model_spec.Variable)
                    and not value.is_scalar()
                    and value.dtype in ("float32", "float16", "bfloat16")
                ):
                    weight, scale = _int8_rows(value)
                    setattr(spec, key, weight)
                    setattr(spec, f"{key}_scale", scale)
                    done.update((name, f"{name}_scale"))

            self._visit(int8)
        quantize(self, quantization, lambda name: name not in done and (variable_filter is None or variable_filter(name)))

    utils.fuse_linear, PyTorchVariable.to_bytes, LayerSpec._quantize = fuse_and_free, tensor_bytes, quantize_in_blocks
    try:
        yield
    finally:
        utils.fuse_linear, PyTorchVariable.to_bytes, LayerSpec._quantize = fuse_linear, to_bytes, quantize


# 512 KiB of float32 per block: its temporaries stay below the 1 MiB at which a conversion maps
# blocks on their own (malloc.big_blocks_mapped), so the heap reuses them instead of faulting in
# fresh pages for every block: faster than bigger blocks, at the same peak.
_BLOCK_ELEMENTS = 1 << 17


def _int8_rows(value: Any) -> tuple[Any, Any]:
    """CTranslate2's int8 quantization (a float32 scale per row, 127 / max |row|, rounded to
    nearest), the same arithmetic, a block of rows at a time: its own temporaries are two float
    copies of the whole tensor, for the token embedding most of a small model's weights."""
    from ctranslate2.specs.model_spec import NumpyVariable, PyTorchVariable

    tensor = value.tensor if isinstance(value, PyTorchVariable) else torch.from_numpy(value.numpy())
    rows = tensor.reshape(tensor.shape[0], -1)  # conv1d weights are scaled per output channel
    weight = np.empty(tuple(rows.shape), dtype=np.int8)
    scale = np.empty(rows.shape[0], dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(1, rows.shape[1]))
    for begin in range(0, rows.shape[0], step):
        block = rows[begin : begin + step].to(torch.float32).numpy()
        amax = np.amax(np.absolute(block), axis=1)
        amax[amax == 0] = 127.0
        amax = np.maximum(amax, np.float32(127) / np.finfo(np.float32).max)
        scale[begin : begin + step] = 127.0 / amax
        weight[begin : begin + step] = np.rint(block * np.expand_dims(scale[begin : begin + step], 1)).astype(np.int8)
    return NumpyVariable(weight.reshape(tuple(tensor.shape))), NumpyVariable(scale)
