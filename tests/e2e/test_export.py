"""Exports to the serving engines: layouts and refusals (fast), and llama.cpp for real.

The llama.cpp tests convert a random draft for the embedded SmolLM2 target with llama.cpp's
own converter, serve it with ``llama-server`` next to an f32 GGUF of the target, and check
(1) temperature-0 output equals the same server's plain decoding, (2) the tokens llama.cpp
drafts equal deepspec's ``propose()`` at the same positions (logit near-ties counted, not
failed), and (3) the acceptance llama.cpp reports equals the one deepspec's proposals give.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors import safe_open

from deepspec.config import load_config
from deepspec.drafts import build_draft
from deepspec.errors import DataError
from deepspec.export import export_draft
from deepspec.export.source import ExportRefused
from tests.badinput import rewrite_draft_weights
from tests.conftest import ROOT

SMALL = ["model.num_draft_layers=1", "model.draft_vocab_size=2048"]


def _draft(tmp_path, smollm2_dir, algo: str, opts=(), seed: int = 0, bigrams: dict | None = None) -> str:
    """A random draft for the embedded target, saved as a checkpoint directory.

    ``bigrams`` {previous token: next token} (DSpark): the Markov head is set to draft the
    next token after each of these previous tokens, so the draft earns real acceptance."""
    cfg = load_config(f"{ROOT}/config/{algo}/{algo}_smollm2_135m.py", [*SMALL, *opts])
    torch.manual_seed(seed)
    # the 1024 lowest ids (bytes and the commonest merges) and 1024 scattered ones
    rest = 1024 + torch.randperm(49152 - 1024, generator=torch.Generator().manual_seed(seed))[:1024]
    ids = torch.cat([torch.arange(1024), rest]).sort().values if cfg.model.draft_vocab_size else None
    model = build_draft(cfg, smollm2_dir, draft_ids=ids)
    with torch.no_grad():
        if getattr(model, "markov_head", None) is not None:
            model.markov_head.W2.weight.normal_(std=0.5)  # exercise the Markov bias
        if getattr(model, "confidence_head", None) is not None:
            model.confidence_head.proj.weight.normal_(std=0.05)
        g = torch.Generator().manual_seed(seed + 1)
        for prev, nxt in (bigrams or {}).items():
            index = int(model.draft_index(torch.tensor(nxt)))
            if index < 0:
                continue
            u = torch.randn(model.markov_head.rank, generator=g)
            u /= u.norm()
            model.markov_head.W1.weight[prev] = u
            model.markov_head.W2.weight[index] += 30.0 * u
    out = tmp_path / f"{algo}_draft"
    model.save_pretrained(str(out))
    return str(out)


def _read(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


# -- layouts and refusals (no engine needed) --------------------------------------------
@pytest.mark.parametrize("algo", ["dspark", "dflash"])
def test_block_draft_export_for_vllm_has_the_loader_keys(tmp_path, smollm2_dir, algo):
    """Keys and shapes of vLLM 0.32's DSpark loader (vllm/model_executor/models/
    qwen3_dspark.py, which its CPU runner cannot run: V2 runner, Triton); block drafts of
    both kinds go in as DSpark because vLLM's DFlash path (qwen3_dflash.py) reads slots 1..K."""
    draft = _draft(tmp_path, smollm2_dir, algo)
    manifest = export_draft(draft, "vllm", str(tmp_path / "out"))
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    tensors = _read(str(tmp_path / "out" / "model.safetensors"))
    src_cfg = json.load(open(os.path.join(draft, "config.json")))
    assert cfg["dflash_config"]["target_layer_ids"] == src_cfg["target_layer_ids"]  # "output of" ids
    assert cfg["dflash_config"]["block_size"] == 7 and manifest["num_speculative_tokens"] == 7
    assert cfg["sliding_window"] == src_cfg["context_window"] == 15
    assert set(cfg["layer_types"]) == {"sliding_attention"}
    assert tensors["fc.weight"].shape == (576, 5 * 576)
    assert tensors["layers.0.self_attn.q_norm.weight"].shape == (64,)
    assert tensors["lm_head.weight"].shape == (2048, 576) and tensors["d2t"].dtype == torch.int64
    assert not any(k.startswith("model.") for k in tensors)
    mask = torch.load(tmp_path / "out" / "mask_embedding.pt")
    assert mask["mask_token_id"] == cfg["dflash_config"]["mask_token_id"]
    src = _read(os.path.join(draft, "model.safetensors"))
    torch.testing.assert_close(mask["embedding"], src["mask_embedding"])
    assert not bool(src["t2d"][mask["mask_token_id"]])  # the host id is outside the draft vocabulary
    # d2t offsets map draft index -> target id exactly as the checkpoint's vocabulary
    ids = torch.arange(2048) + tensors["d2t"]
    assert torch.equal(src["t2d"].nonzero().flatten(), ids)
    # vLLM's DSpark path (anchor-first) for both; it ignores mask_embedding.pt, so the mask
    # vector also rides on the host row of the shipped embedding
    assert cfg["architectures"] == ["DSparkDraftModel"] and manifest["method"] == "dspark"
    torch.testing.assert_close(tensors["embed_tokens.weight"][mask["mask_token_id"]], src["mask_embedding"])
    if algo == "dspark":
        assert tensors["markov_head.markov_w1.weight"].shape == (49152, 128)
        assert tensors["markov_head.markov_w2.weight"].shape == (2048, 128)
        assert tensors["confidence_head.proj.weight"].shape == (1, 576 + 128)
        assert cfg["markov_head_type"] == "vanilla" and cfg["enable_confidence_head"]
    else:  # DFlash: a Markov bias of exactly zero, no confidence cut
        assert cfg["markov_rank"] == 1 and not cfg["enable_confidence_head"]
        assert not tensors["markov_head.markov_w2.weight"].any() and tensors[
            "markov_head.markov_w2.weight"
        ].shape == (2048, 1)
        assert "confidence_head.proj.weight" not in tensors


def test_eagle3_export_shifts_layer_ids_and_renames(tmp_path, smollm2_dir):
    draft = _draft(tmp_path, smollm2_dir, "eagle3")
    export_draft(draft, "vllm", str(tmp_path / "out"))
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    tensors = _read(str(tmp_path / "out" / "model.safetensors"))
    src = _read(os.path.join(draft, "model.safetensors"))
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 15, 28]  # "input of": deepspec [1, 14, 27] + 1
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 2048 and cfg["target_hidden_size"] == 576
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (576, 2 * 576)
    assert tensors["fc.weight"].shape == (576, 3 * 576)
    torch.testing.assert_close(tensors["midlayer.input_layernorm.weight"], src["embed_norm.weight"])
    torch.testing.assert_close(tensors["midlayer.hidden_norm.weight"], src["layers.0.input_layernorm.weight"])
    assert torch.equal(tensors["d2t"], src["d2t"])


@pytest.mark.parametrize(
    "algo, opts, to, reason",
    [
        ("dspark", ["model.markov_head_type=gated"], "llamacpp", "computes only the vanilla head"),
        ("dflash", ["model.qk_norm=false"], "vllm", "no q/k norms"),
        ("eagle3", ["model.target_layer_ids=[1,7,14,21,27]"], "llamacpp", "takes exactly 3"),
        ("eagle3", ["model.target_layer_ids=[1,14,29]"], "vllm", "last layer's output"),
        ("eagle3", ["model.draft_num_hidden_layers=2"], "vllm", "take exactly 1"),
    ],
)
def test_export_refuses_what_the_engine_cannot_represent(tmp_path, smollm2_dir, algo, opts, to, reason):
    draft = _draft(tmp_path, smollm2_dir, algo, opts)
    with pytest.raises(ExportRefused, match=reason):
        export_draft(draft, to, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_diverged_checkpoint_exports_nowhere(tmp_path, smollm2_dir):
    from safetensors.torch import load_file

    draft = _draft(tmp_path, smollm2_dir, "dflash")
    weights = os.path.join(draft, "model.safetensors")
    tensors = load_file(weights)
    tensors["norm.weight"][3] = float("nan")
    rewrite_draft_weights(draft, tensors)
    with pytest.raises(DataError, match=r"not finite .*NaN/inf in norm.weight"):
        export_draft(draft, "vllm", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_cli_reports_one_line(tmp_path, smollm2_dir):
    draft = _draft(tmp_path, smollm2_dir, "dspark", ["model.markov_head_type=rnn"])
    proc = subprocess.run(  # the scripts/ wrapper runs python -m deepspec.export
        ["bash", f"{ROOT}/scripts/serve/export.sh", draft, "--to", "llamacpp", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot export") and "vanilla" in lines[0]
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspec.export",
            str(tmp_path / "nope"),
            "--to",
            "vllm",
            "--out",
            str(tmp_path / "y"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        missing.returncode != 0
        and "does not exist" in missing.stderr
        and len(missing.stderr.splitlines()) == 1
    )


@pytest.mark.parametrize("algo", ["eagle3", "dflash", "dspark"])
def test_sglang_export_matches_its_loader(tmp_path, smollm2_dir, algo):
    """Keys, shapes and layer ids as SGLang 0.5.23's loaders read them (read from its
    source: python/sglang/srt/models/llama_eagle3.py, dflash.py, dspark.py and
    dspark_components/dspark_config.py; model/spec_aux_hidden_state.py adds the +1)."""
    full = ["model.draft_vocab_size=0"] if algo != "eagle3" else []
    draft = _draft(tmp_path, smollm2_dir, algo, full)
    export_draft(draft, "sglang", str(tmp_path / "out"))
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    tensors = _read(str(tmp_path / "out" / "model.safetensors"))
    src_cfg = json.load(open(os.path.join(draft, "config.json")))
    if algo == "eagle3":
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 2048
        # SGLang's Eagle3 ids mean "output of layer k", as deepspec's (it adds the +1 itself)
        assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == src_cfg["target_layer_ids"]
        assert isinstance(cfg["target_hidden_size"], int) and "norm_before_residual" not in cfg
        assert {"midlayer.hidden_norm.weight", "lm_head.weight", "d2t", "fc.weight"} <= set(tensors)
        return
    assert cfg["architectures"] == ["DSparkDraftModel"]  # DFlash too: SGLang's DSpark reads slot 0 first
    assert cfg["dflash_config"]["target_layer_ids"] == src_cfg["target_layer_ids"]
    assert 0 <= cfg["dflash_config"]["mask_token_id"] < 49152 and cfg["sample_from_anchor"] is True
    assert not {"lm_head.weight", "d2t", "embed_tokens.weight"} & set(tensors)  # the target's head
    assert tensors["fc.weight"].shape == (576, 5 * 576) and "layers.0.self_attn.k_norm.weight" in tensors
    if algo == "dspark":
        assert cfg["markov_rank"] == 128 and cfg["markov_head_type"] == "vanilla"
        assert tensors["markov_head.markov_w2.weight"].shape == (49152, 128)  # full vocabulary
        assert tensors["confidence_head.proj.weight"].shape == (1, 576 + 128)
    else:  # zero Markov bias; SGLang always runs a confidence head: survival ~1, never cuts
        assert tensors["markov_head.markov_w2.weight"].shape == (49152, 1)
        assert not tensors["markov_head.markov_w2.weight"].any()
        assert (
            not tensors["confidence_head.proj.weight"].any()
            and tensors["confidence_head.proj.bias"].item() == 30.0
        )


def test_sglang_refuses_a_pruned_block_draft(tmp_path, smollm2_dir):
    draft = _draft(tmp_path, smollm2_dir, "dspark")
    with pytest.raises(ExportRefused, match="full vocabulary"):
        export_draft(draft, "sglang", str(tmp_path / "out"))


def _engine_python(name: str) -> str | None:
    from deepspec.targets import cache_root

    path = os.path.join(cache_root(), f"{name}-venv", "bin", "python")
    return path if os.access(path, os.X_OK) else None


@pytest.mark.skipif(
    _engine_python("speculators") is None, reason="no speculators venv (bash scripts/setup.sh --serving)"
)
def test_speculators_loads_every_export_with_its_own_loader(tmp_path, smollm2_dir):
    classes = {"eagle3": "Eagle3DraftModel", "dflash": "DFlashDraftModel", "dspark": "DSparkDraftModel"}
    cases = {"eagle3": [], "eagle3-full": ["model.draft_vocab_size=0"], "dflash": [], "dspark": []}
    dirs = {}
    for name, opts in cases.items():
        algo = name.split("-")[0]
        draft = _draft(tmp_path, smollm2_dir, algo, opts)
        dirs[name] = str(tmp_path / f"spec_{name}")
        manifest = export_draft(draft, "speculators", dirs[name], target_dir=smollm2_dir)
        cfg = json.load(open(os.path.join(dirs[name], "config.json")))
        src_ids = json.load(open(os.path.join(draft, "config.json")))["target_layer_ids"]
        key = "eagle_aux_hidden_state_layer_ids" if algo == "eagle3" else "aux_hidden_state_layer_ids"
        assert cfg[key] == [i + 1 for i in src_ids]  # "input of layer k"
        if algo != "eagle3":
            assert any("fixed window" in n for n in manifest["notes"])  # the window caveat is said
    proc = subprocess.run(
        [_engine_python("speculators"), f"{ROOT}/tests/engines/speculators_load.py", *dirs.values()],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["dir"]: r for r in map(json.loads, proc.stdout.strip().splitlines())}
    for name, d in dirs.items():
        r, algo = results[d], name.split("-")[0]
        assert r["class"] == classes[algo] and r["unexpected"] == [] and r["differ"] == [], r
        # block drafters never store the embedding: speculators takes the verifier's
        assert r["missing"] == ([] if algo == "eagle3" else ["embed_tokens.weight"]), r


# -- llama.cpp, for real ------------------------------------------------------------------
def _llama_server_built() -> bool:
    from deepspec.targets import llama_server_bin

    return os.access(llama_server_bin(), os.X_OK)


needs_llama_server = pytest.mark.skipif(
    not _llama_server_built(), reason="llama-server is not built (bash scripts/setup.sh --llama-server)"
)
PROMPTS = [
    "What is 12 times 7? Explain step by step.",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
]
TIE = 0.02  # llama.cpp's top-2 probabilities closer than this: a near-tie, counted, not failed


@pytest.fixture(scope="module")
def f32_target(smollm2_dir):
    """An f32 GGUF of the embedded target (converted once into the cache), and the same
    target in f32 in torch: both sides compute in f32, so drafts agree up to near-ties."""
    from transformers import AutoModelForCausalLM

    from deepspec.export.engines import run_converter
    from deepspec.targets import cache_root

    gguf = os.path.join(cache_root(), "targets", "smollm2-135m-instruct-f32.gguf")
    if not os.path.isfile(gguf):  # converted once, atomically, and kept in the cache
        tmp = f"{gguf}.tmp{os.getpid()}"
        try:
            run_converter(smollm2_dir, tmp, "f32")
            os.replace(tmp, gguf)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return gguf, model


def _prompt_ids(tokenizer) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in PROMPTS
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def compare_with_propose(draft, target_model, sequence: list[int], blocks) -> dict[str, int]:
    """Replay llama.cpp's drafted ``blocks`` of one request with deepspec's ``propose()``.

    Per block: the context and anchor llama.cpp logged, the same target features (f32 HF),
    the same number of drafted tokens. Compared slot by slot up to the first difference
    (later slots condition on it). Also the accepted-token count each side's drafts earn
    against the generated ``sequence``."""
    from deepspec.eval.target import HFTarget

    target = HFTarget(target_model, draft.config.target_layer_ids)
    target.reset()
    _, features = target.forward(torch.tensor(sequence))
    stats = dict(slots=0, equal=0, ties=0, other=0, accepted_ours=0, accepted_theirs=0, blocks=len(blocks))
    for block in blocks:
        c = block.context
        assert sequence[c] == block.anchor, (c, sequence[c], block.anchor)
        state = draft.new_state(1)
        draft.extend(state, features[None, :c], torch.tensor([c]), tokens=torch.tensor([sequence[:c]]))
        kwargs = {"num_tokens": len(block.tokens)} if draft.algorithm == "eagle3" else {}
        ours = (
            draft.propose(state, torch.tensor([block.anchor]), temperature=0.0, **kwargs).tokens[0].tolist()
        )
        for i, (a, b) in enumerate(zip(ours, block.tokens)):
            stats["slots"] += 1
            if a == b:
                stats["equal"] += 1
                continue
            stats["ties" if block.runner_up_gap[i] < TIE else "other"] += 1
            break
        truth = sequence[c + 1 : c + 1 + block.kept]
        for key, drafted in (("accepted_ours", ours), ("accepted_theirs", block.tokens)):
            n = 0
            while n < len(truth) and drafted[n] == truth[n]:
                n += 1
            stats[key] += n
    return stats


@needs_llama_server
@pytest.mark.slow
@pytest.mark.parametrize("algo", ["dspark", "dflash", "eagle3"])
def test_llamacpp_serves_the_export_losslessly_and_drafts_like_deepspec(
    tmp_path, smollm2_dir, smollm2_tokenizer, f32_target, algo
):
    from deepspec.drafts import load_draft
    from deepspec.export.llamacpp_server import LlamaServer, drafted_blocks

    gguf, target_model = f32_target
    prompts = _prompt_ids(smollm2_tokenizer)
    n_predict = 40
    with LlamaServer(target=gguf, log=str(tmp_path / "plain.log")) as plain:
        expected = [plain.complete(p, n_predict)["tokens"] for p in prompts]
    bigrams = {}
    if algo == "dspark":  # most frequent successor of each token in the plain outputs
        pairs = Counter((a, b) for out in expected for a, b in zip(out, out[1:]))
        for (a, b), _ in sorted(pairs.items(), key=lambda kv: kv[1]):
            bigrams[a] = b
    draft_dir = _draft(tmp_path, smollm2_dir, algo, bigrams=bigrams)
    manifest = export_draft(draft_dir, "llamacpp", str(tmp_path / "gguf"), target_dir=smollm2_dir)
    assert manifest["spec_type"] == ("draft-eagle3" if algo == "eagle3" else "draft-dspark")
    assert sorted(os.listdir(tmp_path / "gguf")) == ["deepspec_export.json", "draft.gguf"]  # no hf/ copy
    log = tmp_path / "spec.log"
    with LlamaServer(
        draft=str(tmp_path / "gguf" / "draft.gguf"),
        spec_type=manifest["spec_type"],
        n_max=manifest["n_max"],
        target=gguf,
        log=str(log),
        verbose=True,
    ) as server:
        replies = [server.complete(p, n_predict) for p in prompts]
    blocks = drafted_blocks(log.read_text(errors="replace"))
    assert len(blocks) == len(prompts)
    draft = load_draft(draft_dir)
    total: dict[str, int] = {}
    for prompt, want, reply, drafted in zip(prompts, expected, replies, blocks):
        assert reply["tokens"] == want  # lossless at temperature 0
        stats = compare_with_propose(draft, target_model, prompt + reply["tokens"], drafted)
        assert reply["timings"]["draft_n_accepted"] == stats["accepted_theirs"]  # our replay = its count
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v
    print(algo, total)
    assert total["blocks"] >= 20
    assert total["other"] == 0, total  # every difference is a logit near-tie
    assert total["ties"] <= max(2, total["slots"] // 50), total
    assert abs(total["accepted_ours"] - total["accepted_theirs"]) <= total["ties"] * manifest["n_max"], total
    if algo == "dspark":  # the bigram head earns acceptance, and both sides count it alike
        assert total["accepted_theirs"] >= 20, total


# -- vLLM, for real (Eagle3; its CPU runner cannot run DSpark, which block drafts export as) --
def _vllm(tmp_path, prompts, n, draft=None, k=7) -> dict:
    from deepspec.targets import resolve_target

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    args = [_engine_python("vllm"), f"{ROOT}/scripts/serve/vllm_generate.py", "--prompts", str(path)]
    args += ["--target", resolve_target("embedded:smollm2-135m-instruct"), "--max-new-tokens", str(n)]
    args += ["--dtype", "float32"]  # bit-exact greedy: bf16 verification of k+1 tokens may flip near-ties
    if draft:
        args += ["--draft", draft, "--method", "eagle3", "--k", str(k)]
    proc = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _always_x_rounds(tokens: list[int], x: int, k: int) -> tuple[int, int, list[int]]:
    """(rounds, accepted, accepted per position) of a draft that always proposes ``k``
    copies of ``x``, replayed on one greedy output (the first token comes from prefill)."""
    rounds = accepted = 0
    per_pos = [0] * k
    i = 1
    while i < len(tokens):
        rounds += 1
        a = 0
        while a < k and i + a < len(tokens) and tokens[i + a] == x:
            per_pos[a] += 1
            a += 1
        accepted += a
        i += a + 1
    return rounds, accepted, per_pos


@pytest.mark.slow
@pytest.mark.skipif(_engine_python("vllm") is None, reason="no vLLM venv (bash scripts/setup.sh --serving)")
def test_vllm_serves_the_eagle3_export_losslessly_and_counts_acceptance_as_deepspec(
    tmp_path, smollm2_dir, smollm2_tokenizer
):
    prompts, n, k = _prompt_ids(smollm2_tokenizer), 32, 4
    plain = _vllm(tmp_path, prompts, n)
    # a random draft: the output stays the target's, token for token
    export_draft(_draft(tmp_path, smollm2_dir, "eagle3"), "vllm", str(tmp_path / "rand"))
    spec = _vllm(tmp_path, prompts, n, str(tmp_path / "rand"), k)
    assert spec["tokens"] == plain["tokens"]
    counts = spec["spec"]
    assert (
        sum(map(len, spec["tokens"]))
        == len(prompts) + counts["spec_decode_num_drafts"] + counts["spec_decode_num_accepted_tokens"]
    )
    # a draft whose final norm is zero proposes its vocabulary's first id, the commonest token
    # of the outputs (through d2t): vLLM's counters must equal the replayed rounds exactly
    x = Counter(t for out in plain["tokens"] for t in out).most_common(1)[0][0]
    from deepspec.drafts import load_draft

    draft_dir = _draft(tmp_path, smollm2_dir, "eagle3", seed=3)
    model = load_draft(draft_dir)
    ids = torch.cat([torch.tensor([x]), x + 1 + torch.randperm(49151 - x)[:2047]]).sort().values
    model.set_draft_vocab(ids)
    model.load_target_embeddings(smollm2_dir)
    with torch.no_grad():
        model.norm.weight.zero_()
    model.save_pretrained(str(tmp_path / "x_draft"))
    export_draft(str(tmp_path / "x_draft"), "vllm", str(tmp_path / "x"))
    got = _vllm(tmp_path, prompts, n, str(tmp_path / "x"), k)
    assert got["tokens"] == plain["tokens"]
    want = [_always_x_rounds(out, x, k) for out in got["tokens"]]
    assert got["spec"]["spec_decode_num_drafts"] == sum(w[0] for w in want)
    assert got["spec"]["spec_decode_num_accepted_tokens"] == sum(w[1] for w in want) > 0
    assert got["spec"]["spec_decode_num_accepted_tokens_per_pos"] == [
        sum(w[2][i] for w in want) for i in range(k)
    ]
    # deepspec's own loop with the same draft proposes the same token: the same rounds
    prop = model.propose(model.new_state(1), torch.tensor([x]), temperature=0.0, num_tokens=k)
    assert prop.tokens[0].tolist() == [x] * k
