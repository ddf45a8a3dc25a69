"""Run ``scripts/serve/llamacpp.sh`` on a free loopback port and talk to it (tests and
benchmarks of exported drafts).

With ``verbose=True`` the server logs every drafted block (``draft candidate`` lines, then
``generate_draft: id=<anchor>, #tokens=<context length>, #draft=<kept>``);
:func:`drafted_blocks` reads them back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from deepspec.errors import EnvironmentProblem
from deepspec.utils.distributed import find_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVE_SCRIPT = os.path.join(ROOT, "scripts", "serve", "llamacpp.sh")


class LlamaServer:
    """``with LlamaServer(draft=..., log=...) as server: server.complete(ids, 32)``."""

    def __init__(
        self,
        *,
        draft: str = "none",
        spec_type: str = "draft-dspark",
        n_max: int = 7,
        target: str | None = None,
        threads: int = 1,
        slots: int = 1,
        log: str,
        verbose: bool = False,
        timeout: float = 120.0,
    ) -> None:
        self.port = find_free_port()
        self.log = log
        args = ["bash", SERVE_SCRIPT, "--draft", draft, "--spec-type", spec_type, "--n-max", str(n_max)]
        args += ["--port", str(self.port), "--threads", str(threads), "--slots", str(slots)]
        if target:
            args += ["--target", target]
        if verbose:
            args += ["--", "-v"]
        self.args = args
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LlamaServer:
        fh = open(self.log, "w")  # noqa: SIM115 - the server writes it until __exit__
        self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT)
        fh.close()
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = open(self.log).read().strip().splitlines()[-3:]
                raise EnvironmentProblem(f"llama-server exited ({self.proc.returncode}): {' | '.join(tail)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        self.__exit__()
        raise EnvironmentProblem(
            f"llama-server did not become healthy in {self.timeout:.0f}s; see {self.log}"
        )

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def complete(self, prompt_ids: list[int], n_predict: int, temperature: float = 0.0) -> dict[str, Any]:
        """``/completion`` on token ids; the reply has ``tokens`` and ``timings``."""
        body = {
            "prompt": prompt_ids,
            "n_predict": n_predict,
            "temperature": temperature,
            "return_tokens": True,
            "cache_prompt": False,
            "seed": 0,
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/completion",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())


@dataclass
class DraftedBlock:
    task: int  # the server's task id (one per request)
    anchor: int  # the last accepted token (block slot 0's input)
    context: int  # positions before the anchor (the anchor sits at this position)
    kept: int  # tokens llama.cpp kept for verification
    tokens: list[int] = field(default_factory=list)  # candidate 0 at each slot
    runner_up_gap: list[float] = field(default_factory=list)  # p(candidate 0) - p(candidate 1)


_CANDIDATE = re.compile(r"draft candidate\s+(\d+), pos\s+(\d+):\s+(-?\d+) \(\s*([-\d.]+)\)")
_GENERATE = re.compile(r"task (\d+) \| generate_draft: id=(\d+), #tokens=(\d+), #draft=(\d+)")


def drafted_blocks(log_text: str) -> list[list[DraftedBlock]]:
    """The drafted blocks of a verbose server log, one list per request (task), in order."""
    blocks: list[DraftedBlock] = []
    slots: dict[int, list[tuple[int, float]]] = {}
    for line in log_text.splitlines():
        m = _CANDIDATE.search(line)
        if m:
            pos, tok, p = int(m[2]), int(m[3]), float(m[4])
            slots.setdefault(pos, []).append((tok, p))
            continue
        m = _GENERATE.search(line)
        if m:
            order = sorted(slots)
            block = DraftedBlock(task=int(m[1]), anchor=int(m[2]), context=int(m[3]), kept=int(m[4]))
            for pos in order:
                cands = slots[pos]
                block.tokens.append(cands[0][0])
                block.runner_up_gap.append(cands[0][1] - (cands[1][1] if len(cands) > 1 else 0.0))
            blocks.append(block)
            slots = {}
    tasks: dict[int, list[DraftedBlock]] = {}
    for block in blocks:
        tasks.setdefault(block.task, []).append(block)
    return list(tasks.values())
