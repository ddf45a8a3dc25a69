"""The on-disk target cache format (version 1): layout, index records, fp8 scaling.

A cache is a directory::

    manifest.json          written last (atomically); without it the cache does not exist
    samples.idx            one 32-byte record per sample (INDEX_DTYPE), sorted by row
    shards/shard-00000.bin samples back to back, each starting at a 64-byte boundary
    shards/shard-00000.json the shard's commit record (written after the .bin is renamed)
    plan.json              the build settings, so --resume refuses different ones

One sample is a block of sections, each starting at a 16-byte boundary (S = seq_len,
L = len(layer_ids), d = hidden_size)::

    input_ids          int32   [S]
    loss_mask          uint8   [S]
    hidden_states      bf16 | fp8_e4m3fn [S, L*d]   layer outputs in layer_ids order
    last_hidden_states bf16 | fp8_e4m3fn [S, d]     final normed hidden state
    scales             float32 [S, L+1]             fp8 only

The attention mask is not stored: stored samples carry no padding, so it is all ones.
Cost per token: ``5 + 2·d·(L+1)`` bytes in bf16 and ``5 + (d+4)·(L+1)`` in fp8, plus at
most 63 + 3·15 bytes of alignment per *sample*.

fp8 scaling is per row: every d-vector (one token of one layer, or of the last hidden
state) is stored as ``q = fp8(x / s)`` with ``s = amax(|x|) / 448`` (448 = the largest
finite e4m3fn value; ``s = 1`` for an all-zero row), and read back as ``q·s``. Per-row
scales follow the very different magnitudes of layers and tokens (attention-sink tokens
are orders of magnitude larger than the rest), so the relative error of each element
stays within e4m3's 2^-4.

Integrity: every record carries the xxh3-64 of its sample block (checked on each read,
together with the token ids against ``target.vocab_size`` from the manifest), every shard
its xxh3-128 and byte size in the manifest, and the manifest an xxh3-128 of its own
canonical JSON (``manifest_checksum``), so edits, truncation and flipped bytes are
detected. ``target.vocab_size`` was added within version 1: caches without it are read,
and their ids checked against the training target's vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

FORMAT_NAME = "deepspec-target-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "samples.idx"
PLAN = "plan.json"
SHARD_DIR = "shards"
SAMPLE_ALIGN = 64
SECTION_ALIGN = 16
FP8_MAX = 448.0
STORAGE_DTYPES = ("bf16", "fp8")

INDEX_DTYPE = np.dtype(
    [
        ("row", "<u8"),  # global row of the source conversation (files in order, 0-based)
        ("offset", "<u8"),  # byte offset of the sample block in its shard
        ("checksum", "<u8"),  # xxh3-64 of the sample block
        ("shard", "<u4"),
        ("seq_len", "<u4"),
    ]
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _align(n: Any, to: int) -> Any:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class SampleLayout:
    """Byte layout of one sample block for a given cache geometry."""

    num_layers: int  # L = len(layer_ids)
    hidden_size: int  # d
    storage: str  # "bf16" | "fp8"

    @property
    def elem_bytes(self) -> int:
        return 2 if self.storage == "bf16" else 1

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token without alignment padding (the format's cost formula)."""
        d, L = self.hidden_size, self.num_layers
        if self.storage == "bf16":
            return 5 + 2 * d * (L + 1)
        return 5 + (d + 4) * (L + 1)

    def _section_sizes(self, seq_len: Any) -> list[tuple[str, Any]]:
        S, d, L, e = seq_len, self.hidden_size, self.num_layers, self.elem_bytes
        sizes = [
            ("input_ids", 4 * S),
            ("loss_mask", S),
            ("hidden_states", e * S * L * d),
            ("last_hidden_states", e * S * d),
        ]
        if self.storage == "fp8":
            sizes.append(("scales", 4 * S * (L + 1)))
        return sizes

    def sections(self, seq_len: int) -> dict[str, tuple[int, int]]:
        """``name -> (offset, nbytes)`` inside the sample block."""
        out: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, nbytes in self._section_sizes(int(seq_len)):
            offset = _align(offset, SECTION_ALIGN)
            out[name] = (offset, nbytes)
            offset += nbytes
        return out

    def block_bytes(self, seq_len: int) -> int:
        """Size of the sample block, padded to :data:`SAMPLE_ALIGN`."""
        return int(self.block_bytes_array(np.array([seq_len]))[0])

    def block_bytes_array(self, seq_lens: np.ndarray) -> np.ndarray:
        """Block sizes for many lengths at once (int64)."""
        seq = np.asarray(seq_lens, dtype=np.int64)
        offset = np.zeros_like(seq)
        for _, nbytes in self._section_sizes(seq):
            offset = _align(offset, SECTION_ALIGN) + nbytes
        return _align(offset, SAMPLE_ALIGN)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8: ``x [..., d]`` → (``q`` fp8_e4m3fn ``[..., d]``, ``scale`` float32 ``[...]``)."""
    x = x.float()
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


# float32 value of each of the 256 e4m3fn bit patterns: decoding by table lookup is faster
# on CPU than torch's float8 -> float conversion.
_FP8_TABLE = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.float8_e4m3fn:
        t = t.view(torch.uint8)
    return t.numpy().tobytes()


def encode_sample(
    layout: SampleLayout,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    hidden_states: torch.Tensor,
    last_hidden_states: torch.Tensor,
) -> bytes:
    """Serialise one sample: ``input_ids``/``loss_mask`` ``[S]``, ``hidden_states``
    ``[S, L*d]``, ``last_hidden_states`` ``[S, d]`` (any float dtype) → the padded block."""
    S = int(input_ids.shape[0])
    L, d = layout.num_layers, layout.hidden_size
    if tuple(hidden_states.shape) != (S, L * d) or tuple(last_hidden_states.shape) != (S, d):
        raise ValueError(
            f"sample shapes {tuple(hidden_states.shape)} / {tuple(last_hidden_states.shape)} "
            f"do not match the cache geometry [S={S}, L*d={L * d}] / [S, d={d}]"
        )
    parts = {
        "input_ids": _tensor_bytes(input_ids.to(torch.int32)),
        "loss_mask": _tensor_bytes(loss_mask.to(torch.uint8)),
    }
    if layout.storage == "bf16":
        parts["hidden_states"] = _tensor_bytes(hidden_states.to(torch.bfloat16))
        parts["last_hidden_states"] = _tensor_bytes(last_hidden_states.to(torch.bfloat16))
    else:
        q_hidden, s_hidden = quantize_fp8(hidden_states.reshape(S, L, d))
        q_last, s_last = quantize_fp8(last_hidden_states)
        parts["hidden_states"] = _tensor_bytes(q_hidden.reshape(S, L * d))
        parts["last_hidden_states"] = _tensor_bytes(q_last)
        parts["scales"] = _tensor_bytes(torch.cat([s_hidden, s_last.unsqueeze(-1)], dim=-1))
    block = bytearray(layout.block_bytes(S))
    for name, (offset, nbytes) in layout.sections(S).items():
        data = parts[name]
        if len(data) != nbytes:  # internal invariant: sizes come from the same layout
            raise AssertionError(f"{name}: {len(data)} bytes, layout says {nbytes}")
        block[offset : offset + nbytes] = data
    return bytes(block)


def decode_sample(
    layout: SampleLayout, block: memoryview | bytes | np.ndarray, seq_len: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Tensors of one sample block (a copy; hidden states in ``dtype``)."""
    buf = np.frombuffer(block, dtype=np.uint8)
    S, L, d = seq_len, layout.num_layers, layout.hidden_size
    sec = layout.sections(S)

    def raw(name: str, np_dtype: Any) -> np.ndarray:
        offset, nbytes = sec[name]
        return buf[offset : offset + nbytes].view(np_dtype)

    out: dict[str, torch.Tensor] = {
        "input_ids": torch.from_numpy(raw("input_ids", "<i4").astype(np.int64)),
        "loss_mask": torch.from_numpy(raw("loss_mask", np.uint8).copy()),
        "attention_mask": torch.ones(S, dtype=torch.uint8),
    }
    if layout.storage == "bf16":
        hidden = torch.from_numpy(raw("hidden_states", "<i2").copy()).view(torch.bfloat16)
        last = torch.from_numpy(raw("last_hidden_states", "<i2").copy()).view(torch.bfloat16)
        out["hidden_states"] = hidden.reshape(S, L * d).to(dtype)
        out["last_hidden_states"] = last.reshape(S, d).to(dtype)
    else:
        scales = raw("scales", "<f4").reshape(S, L + 1)
        hidden = _FP8_TABLE[raw("hidden_states", np.uint8)].reshape(S, L, d) * scales[:, :L, None]
        last = _FP8_TABLE[raw("last_hidden_states", np.uint8)].reshape(S, d) * scales[:, L, None]
        out["hidden_states"] = torch.from_numpy(hidden.reshape(S, L * d)).to(dtype)
        out["last_hidden_states"] = torch.from_numpy(last).to(dtype)
    return out


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """xxh3-128 of the manifest without its ``manifest_checksum`` key."""
    body = {k: v for k, v in manifest.items() if k != "manifest_checksum"}
    return xxhash.xxh3_128_hexdigest(canonical_json(body))
