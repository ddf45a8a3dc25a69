"""Read a target cache lazily and check it against a training config.

``CacheDataset(path)`` validates the cache when it is opened (manifest present and
unedited, index checksum, shard sizes, index records consistent with the shards) and
memory-maps the shards on first use, so a sample read touches only that sample's bytes.
Each read verifies that sample: the xxh3-64 of its block against the index, and every
token id against the target's vocabulary (``[0, vocab_size)``). :meth:`CacheDataset.verify_shards`
re-hashes whole shards.

``python -m deepspec.data.cache_reader DIR`` checks every sample this way;
``--full`` also re-hashes the shards and decodes every sample.

Every check raises a one-line :class:`~deepspec.errors.DataError` that names the cache,
the shard and sample, and the fix (never ``assert``, so validation also runs under
``python -O``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
import xxhash

from deepspec.cli import ArgumentParser, run_main
from deepspec.config import Config
from deepspec.data.cache_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_DTYPE,
    MANIFEST,
    SAMPLE_ALIGN,
    STORAGE_DTYPES,
    SampleLayout,
    decode_sample,
    manifest_checksum,
)
from deepspec.data.chat import load_chat_template
from deepspec.data.fingerprint import chat_fingerprint, target_fingerprint
from deepspec.errors import DataError
from deepspec.targets.family import load_family_spec

REPAIR_HINT = (
    "repair it with scripts/data/prepare_target_cache.py --resume and the arguments it was built "
    "with (damaged shards are rebuilt), or rebuild it with --overwrite"
)

# the checksums match but the content is wrong: written so, a rebuild is the only fix
REBUILD_HINT = "it was written wrong: rebuild it with scripts/data/prepare_target_cache.py --overwrite"


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check ``<path>/manifest.json`` (presence, JSON, format, own checksum)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(f"target cache {path} not found (build it with scripts/data/prepare_target_cache.py)")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise DataError(
            f"target cache {path} is incomplete: no {MANIFEST} (its writer did not finish; "
            f"rerun prepare_target_cache.py with --resume)"
        )
    try:
        with open(manifest_path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"target cache {path}: {MANIFEST} is unreadable ({reason}); {REPAIR_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"target cache {path}: {MANIFEST} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"target cache {path}: format version {manifest.get('version')!r} is not supported "
            f"(this deepspec reads version {FORMAT_VERSION}); rebuild the cache"
        )
    if manifest.get("manifest_checksum") != manifest_checksum(manifest):
        raise DataError(
            f"target cache {path}: {MANIFEST} was modified after it was written (checksum mismatch); "
            f"{REPAIR_HINT}"
        )
    return manifest


class CacheDataset(torch.utils.data.Dataset):
    """Random access to the samples of a target cache.

    ``ds[i]`` is a dict of tensors for sample ``i`` (samples sorted by source row):
    ``input_ids`` int64 ``[S]``, ``loss_mask`` uint8 ``[S]``, ``attention_mask`` uint8
    ``[S]`` (all ones), ``hidden_states`` ``[S, L*d]`` and ``last_hidden_states``
    ``[S, d]`` in ``dtype`` (fp8 caches are dequantised), and ``row`` (int, the source
    row).

    Every read is verified (see :meth:`check_sample`); a sample that fails raises a
    :class:`DataError`. Token ids are checked against ``vocab_size``: the manifest's
    ``target.vocab_size``, else the ``vocab_size`` argument (caches written before the
    manifest recorded it; :func:`validate_cache_for_config` supplies the target's).
    ``verify_samples=False`` skips the per-read checks (for measuring their cost only).
    :meth:`use_layers` makes ``hidden_states`` hold a subset of the cached layers (a
    5-layer cache serves a 3-layer Eagle3 draft).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.bfloat16,
        verify_samples: bool = True,
        vocab_size: int | None = None,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.dtype = dtype
        self.verify_samples = verify_samples
        self.manifest = read_manifest(self.path)
        self._check_manifest_fields()
        if self.vocab_size is None and vocab_size is not None:
            self.vocab_size = int(vocab_size)
        self.layout = SampleLayout(len(self.layer_ids), self.hidden_size, self.storage)
        self.index = self._load_index()
        self._check_shards_and_index()
        self._maps: dict[int, np.memmap] = {}
        # per-sample lookups as plain arrays: a read costs a few element accesses
        self._seq = self.index["seq_len"].astype(np.int64)
        self._start = self.index["offset"].astype(np.int64)
        self._stop = self._start + self.layout.block_bytes_array(self._seq)
        self._shard = self.index["shard"].astype(np.int64)
        self._checksum = self.index["checksum"].copy()
        self._pick: list[int] | None = None  # positions of the used layers among the cached

    def use_layers(self, layer_ids: list[int]) -> None:
        """Serve only ``layer_ids`` (in the cache's order) as ``hidden_states``."""
        if not set(layer_ids) <= set(self.layer_ids) or list(layer_ids) != sorted(layer_ids):
            raise DataError(
                f"target cache {self.path}: layers {list(layer_ids)} are not an increasing subset of its "
                f"layers {self.layer_ids}; rebuild the cache with them"
            )
        pick = [self.layer_ids.index(i) for i in layer_ids]
        self._pick = None if pick == list(range(len(self.layer_ids))) else pick

    # -- validation at open --------------------------------------------------------------
    def _fail(self, message: str, fix: str = REPAIR_HINT) -> DataError:
        """A damaged cache: the message, then how to repair it."""
        return DataError(f"target cache {self.path}: {message}; {fix}")

    def _check_manifest_fields(self) -> None:
        m = self.manifest
        try:
            self.layer_ids = [int(i) for i in m["layer_ids"]]
            self.hidden_size = int(m["target"]["hidden_size"])
            self.storage = str(m["storage"]["hidden_dtype"])
            self.max_length = int(m["tokenization"]["max_length"])
            self.shards = [dict(s) for s in m["shards"]]
            int(m["index"]["records"])
            vocab = m["target"].get("vocab_size")  # absent in caches of older deepspec versions
            self.vocab_size = None if vocab is None else int(vocab)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._fail(f"{MANIFEST} lacks or mangles field {exc}") from None
        if self.vocab_size is not None and self.vocab_size < 1:
            raise self._fail(f"{MANIFEST} records vocab size {self.vocab_size}")
        if self.storage not in STORAGE_DTYPES:
            raise self._fail(f"unknown hidden dtype {self.storage!r} (expected one of {STORAGE_DTYPES})")

    def _load_index(self) -> np.ndarray:
        info = self.manifest["index"]
        path = os.path.join(self.path, info["file"])
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError:
            raise self._fail(f"index {info['file']} is missing") from None
        expected = int(info["records"]) * INDEX_DTYPE.itemsize
        if len(raw) != expected:
            raise self._fail(f"index {info['file']} has {len(raw)} bytes, expected {expected} (truncated?)")
        if "xxh3-128:" + xxhash.xxh3_128_hexdigest(raw) != info.get("checksum"):
            raise self._fail(f"index {info['file']} failed its checksum (corrupted)")
        return np.frombuffer(raw, dtype=INDEX_DTYPE)

    def _check_shards_and_index(self) -> None:
        num = len(self.shards)
        for shard in self.shards:
            file = os.path.join(self.path, shard["file"])
            if not os.path.isfile(file):
                raise self._fail(f"shard {shard['file']} is missing")
            size = os.path.getsize(file)
            if size != shard["bytes"]:
                what = "truncated" if size < shard["bytes"] else "has extra bytes"
                raise self._fail(f"shard {shard['file']} is {what}: {size} bytes, expected {shard['bytes']}")
        idx = self.index
        if len(idx) != int(self.manifest["counts"]["samples"]):
            raise self._fail(
                f"index has {len(idx)} records but the manifest counts {self.manifest['counts']['samples']}"
            )
        if len(idx) == 0:
            return
        if (idx["shard"] >= num).any():
            raise self._fail("index refers to a shard that the manifest does not list")
        if (idx["seq_len"] < 1).any() or (idx["seq_len"] > self.max_length).any():
            raise self._fail(f"index holds a sequence length outside 1..max_length={self.max_length}")
        if (idx["offset"] % SAMPLE_ALIGN).any():
            raise self._fail("index holds an unaligned sample offset")
        sizes = self.layout.block_bytes_array(idx["seq_len"])
        order = np.lexsort((idx["offset"], idx["shard"]))
        shard_of, start, size = idx["shard"][order], idx["offset"][order].astype(np.int64), sizes[order]
        expected_start = np.zeros_like(start)
        same = shard_of[1:] == shard_of[:-1]
        expected_start[1:] = np.where(same, start[:-1] + size[:-1], 0)
        if (start != expected_start).any():
            raise self._fail("index offsets do not tile the shards (corrupted index)")
        ends = np.zeros(num, dtype=np.int64)
        counts = np.bincount(shard_of, minlength=num)
        np.maximum.at(ends, shard_of, start + size)
        for s, shard in enumerate(self.shards):
            if ends[s] != shard["bytes"] or counts[s] != shard["samples"]:
                raise self._fail(f"index does not match shard {shard['file']} (corrupted index)")
        if (np.diff(idx["row"].astype(np.int64)) <= 0).any():
            raise self._fail("index rows are not strictly increasing (corrupted index)")

    # -- access ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        """Sequence length of every sample (int64 ``[N]``), e.g. for length-grouped batching."""
        return self.index["seq_len"].astype(np.int64)

    @property
    def rows(self) -> np.ndarray:
        """Source row of every sample (int64 ``[N]``)."""
        return self.index["row"].astype(np.int64)

    def _map(self, shard: int) -> np.memmap:
        mm = self._maps.get(shard)
        if mm is None:
            file = os.path.join(self.path, self.shards[shard]["file"])
            mm = np.memmap(file, dtype=np.uint8, mode="r")
            self._maps[shard] = mm
        return mm

    def raw_block(self, i: int) -> np.ndarray:
        """The stored bytes of sample ``i`` (a read-only view into the mapped shard)."""
        return self._map(int(self._shard[i]))[int(self._start[i]) : int(self._stop[i])]

    def _where(self, i: int) -> str:
        rec = self.index[i]
        return f"sample {i} (row {int(rec['row'])}) in {self.shards[int(rec['shard'])]['file']}"

    def check_sample(self, i: int) -> np.ndarray:
        """Sample ``i``'s stored bytes after verifying them: the block's xxh3-64 against the
        index, and its token ids against ``[0, vocab_size)`` when the vocabulary is known."""
        block = self.raw_block(i)
        if xxhash.xxh3_64_intdigest(block) != int(self._checksum[i]):
            raise self._fail(f"{self._where(i)} failed its checksum (corrupted shard)")
        if self.vocab_size is not None:
            ids = block[: 4 * int(self._seq[i])].view("<i4")  # input_ids: the block's first section
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                raise self._fail(
                    f"{self._where(i)} holds token id {low if low < 0 else high} outside the target's "
                    f"vocabulary [0, {self.vocab_size})",
                    fix=REBUILD_HINT,
                )
        return block

    def check_decoded(self, i: int) -> None:
        """Checks of the decoded sample ``i`` (``--full``): a 0/1 loss mask with at least
        one supervised token and finite hidden states."""
        sample = self[i]
        mask = sample["loss_mask"]
        if bool((mask > 1).any()) or int(mask.sum()) < 1:
            raise self._fail(f"{self._where(i)} has an invalid loss mask", fix=REBUILD_HINT)
        for key in ("hidden_states", "last_hidden_states"):
            if not bool(torch.isfinite(sample[key]).all()):
                raise self._fail(f"{self._where(i)} holds non-finite {key}", fix=REBUILD_HINT)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, loss_mask)`` of sample ``i`` without decoding its hidden states
        (int64 and uint8 ``[S]``; not checksum-verified)."""
        S = int(self._seq[i])
        block = np.frombuffer(self.raw_block(int(i)), dtype=np.uint8)
        sec = self.layout.sections(S)
        (io, inb), (mo, mnb) = sec["input_ids"], sec["loss_mask"]
        return block[io : io + inb].view("<i4").astype(np.int64), block[mo : mo + mnb].copy()

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a cache of {len(self)} samples")
        i = int(i) % len(self)
        block = self.check_sample(i) if self.verify_samples else self.raw_block(i)
        sample = decode_sample(self.layout, block, int(self._seq[i]), self.dtype)
        if self._pick is not None:
            hs = sample["hidden_states"]
            sample["hidden_states"] = hs.view(hs.shape[0], -1, self.hidden_size)[:, self._pick].flatten(1)
        sample["row"] = int(self.index["row"][i])
        return sample

    def verify_shards(self, progress: bool = False) -> None:
        """Re-hash every whole shard and compare with the manifest (reads the whole cache)."""
        from tqdm import tqdm

        total = sum(int(s["bytes"]) for s in self.shards)
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="verify") as bar:
            for shard in self.shards:
                hasher = xxhash.xxh3_128()
                with open(os.path.join(self.path, shard["file"]), "rb") as fh:
                    while chunk := fh.read(16 << 20):
                        hasher.update(chunk)
                        bar.update(len(chunk))
                if "xxh3-128:" + hasher.hexdigest() != shard["checksum"]:
                    raise self._fail(f"shard {shard['file']} failed its checksum (corrupted)")

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers map shards themselves
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def summary(self) -> str:
        m = self.manifest
        c = m["counts"]
        size = sum(int(s["bytes"]) for s in self.shards)
        return (
            f"{len(self)} samples, {c['tokens']} tokens ({c['loss_tokens']} supervised), "
            f"{len(self.shards)} shards, {size / 2**20:.1f} MiB, {self.storage}, "
            f"layers {self.layer_ids}, hidden {self.hidden_size}, vocab {self.vocab_size or 'not recorded'}, "
            f"target {m['target']['name']}"
        )


def sample_tokens_of(dataset: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, loss_mask)`` of sample ``i`` of any training dataset, without reading
    its hidden states where the dataset can (a target cache)."""
    fast = getattr(dataset, "tokens", None)
    if fast is not None:
        return fast(i)
    sample = dataset[i]
    return np.asarray(sample["input_ids"]), np.asarray(sample["loss_mask"])


def validate_cache_for_config(
    cache_or_path: CacheDataset | str | os.PathLike[str], cfg: Config, target_dir: str | os.PathLike[str]
) -> CacheDataset:
    """Check that a cache fits a training config and its resolved target directory.

    Compares layer ids, hidden size, the target's fingerprint, the tokenizer + chat
    template fingerprint, ``max_length`` and ``min_loss_tokens``; raises one
    :class:`DataError` line naming every mismatch. Returns the opened dataset.
    """
    from transformers import AutoTokenizer

    cache = cache_or_path if isinstance(cache_or_path, CacheDataset) else CacheDataset(cache_or_path)
    m = cache.manifest
    problems: list[str] = []
    want_layers = [int(i) for i in cfg.model.target_layer_ids]
    try:
        cache.use_layers(want_layers)  # the same layers, or a subset of them
    except DataError:
        problems.append(f"layer ids {cache.layer_ids} in the cache, model.target_layer_ids={want_layers}")
    spec = load_family_spec(target_dir)
    if cache.hidden_size != spec.hidden_size:
        problems.append(f"hidden size {cache.hidden_size} in the cache, {spec.hidden_size} in the target")
    if cache.vocab_size is None:  # written before the manifest recorded it: check against the target
        cache.vocab_size = int(spec.vocab_size)
    elif cache.vocab_size != spec.vocab_size:
        problems.append(f"vocab size {cache.vocab_size} in the cache, {spec.vocab_size} in the target")
    target_fp = target_fingerprint(target_dir)
    if m["target"].get("fingerprint") != target_fp:
        problems.append(
            f"built from target {m['target'].get('name')!r} ({m['target'].get('fingerprint')}), "
            f"but {cfg.model.target_model_name_or_path!r} is {target_fp}"
        )
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(target_dir))
    chat_fp = chat_fingerprint(
        tokenizer,
        chat_template=load_chat_template(cfg.data.chat_template),
        system_prompt=cfg.data.system_prompt,
        enable_thinking=cfg.data.enable_thinking,
    )
    tok = m["tokenization"]
    if tok.get("chat_fingerprint") != chat_fp:
        problems.append(
            "tokenizer / chat template / data.system_prompt / data.enable_thinking differ from the cache's"
        )
    for key in ("max_length", "min_loss_tokens"):
        value = getattr(cfg.data, key)
        if tok.get(key) != value:
            problems.append(f"data.{key}={value} but the cache was built with {tok.get(key)}")
    if problems:
        raise DataError(
            f"target cache {cache.path} does not match the config: "
            + "; ".join(problems)
            + " (rebuild the cache)"
        )
    return cache


def main() -> int:
    import sys

    from tqdm import tqdm

    parser = ArgumentParser(
        prog="python -m deepspec.data.cache_reader",
        description="Check a target cache (every sample's checksum and token ids) and print a summary.",
    )
    parser.add_argument("path", help="the cache directory")
    parser.add_argument(
        "--full",
        action="store_true",
        help="also re-hash every whole shard and decode every sample (finite hidden states, 0/1 loss mask)",
    )
    args = parser.parse_args()
    cache = CacheDataset(args.path)
    show = sys.stderr.isatty()
    if args.full:
        cache.verify_shards(progress=show)
    for i in tqdm(range(len(cache)), desc="samples", disable=not show):
        if args.full:
            cache.check_decoded(i)  # reads sample i, verified like every read
        else:
            cache.check_sample(i)
    checked = (
        "checksums and token ids"
        if cache.vocab_size
        else (
            "checksums; token ids unchecked: this older manifest records no vocab size, training checks "
            "them against the target"
        )
    )
    print(f"ok: {cache.summary()}; every sample verified ({checked}{', decoded' if args.full else ''})")
    return 0


if __name__ == "__main__":
    run_main(main)
