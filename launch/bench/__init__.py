"""`specpipe bench` (DESIGN §5): every way of decoding the same prompts with the same model pair,
side by side, in one invocation.

Methods (each request decodes one prompt; a method's figure for a trial covers all prompts):

- `hf_autoregressive`: Hugging Face `generate` with the target alone, in this process, one torch
  thread. THE baseline: every speedup is tokens/s over this method's tokens/s in the same trial.
  `hf_autoregressive_2threads`: the same with two threads (this machine's whole CPU).
- `hf_assisted_default`: `generate(assistant_model=draft)` with the assistant's own generation
  settings (transformers' defaults: 20 tokens, confidence threshold 0.4). `hf_assisted_best`: a
  fixed draft length (`num_assistant_tokens_schedule="constant"`, no confidence stop), the best of
  a grid (2, 4, 6, 8; --quick 2, 4) picked by a calibration pass before the first trial, per
  temperature. Their drafted tokens and verifications are counted from forward calls.
- `specpipe_<mode>` for each server mode (autoregressive, sequential, pipelined, specbranch),
  through ONE `specpipe serve` child process, every request pinned to its mode. A mode the server
  rejects, or runs as another mode, is recorded as that method's error; the run goes on.

Temperature 0 is greedy (HF: do_sample=False); temperature 1 samples (HF: do_sample=True,
top_k=0), seeded per (trial, prompt), the same seed for every method. Methods are interleaved:
trial t runs every method once, in an order shuffled with a seed, so drift of a shared machine
hits all alike; summaries are medians over trials with min/max and quartiles.

Correctness: at temperature 0 every method's token ids must equal `hf_autoregressive`'s for each
prompt (`matches_autoregressive`); a mismatch is logged as an error, flagged in results.md, and
makes the command exit 1.

The analytical bound, with a = the method's measured acceptance rate (accepted / drafted), k =
its measured drafted tokens per verification, rounded (a confidence stop, HF's default or the
server's policy, ends blocks before the configured length), and costs timed in this process on
one thread with a warm KV cache (t_ar: one target step of 1 token; t_draft: one draft step;
t_verify(k): one target forward of k + 1 tokens):

    E(a, k)      = (1 - a^(k+1)) / (1 - a)          expected tokens per round (k + 1 at a = 1)
    serial       = E * t_ar / (k * t_draft + t_verify(k))       Leviathan et al. 2023: the target
                                                                waits while the draft drafts
    overlapped   = E * t_ar / max(t_verify(k), k * t_draft)     pipelined: the target never waits
    % of bound   = measured speedup / bound   (serial for HF assisted and sequential, overlapped
                                              for pipelined and specbranch, 1 for autoregressive)

accepted / drafted also counts the drafted tokens past the first rejection, so it is at most the
per-token acceptance probability and the bound it gives can sit below the true one (a method may
show more than 100%); the JSON also holds `a_implied`, the a whose E equals the measured tokens
per verification. t_ar is one bare forward while the baseline's tokens/s includes HF generate's
per-step overhead, which `specpipe_autoregressive` against its bound of 1 makes visible.

Network latency axis: specpipe sequential, pipelined and specbranch (greedy) with the draft worker
behind a link of each one-way latency: a network namespace and a veth pair with netem on both
ends where the machine allows it (root, `ip netns`, netem in the kernel), else a userspace TCP
relay in this process that holds each chunk for the latency (labelled simulated). One server, one
draft worker; the link's delay is changed between requests so latencies interleave too.

Outputs under --out: results.json (machine, config, every per-trial figure, summaries),
results.md (tables for the README), speedup.png.

The package: config.py (flags, presets, BenchConfig), run.py (the run, `main`), runners.py (the timed methods and the trial loop),
report.py (summaries, bounds), tables.py (the three outputs and their tables), link.py (the
latency axis's link). It talks to the server only through `specpipe.Client` and starts it
through launch/local.py's public helpers; it knows nothing of the wire protocol. E(a, k) is specpipe/acceptance.py's, shared with the
coordinator's policy.
"""

from specpipe.launch.bench.config import add_bench_args
from specpipe.launch.bench.run import main

__all__ = ["add_bench_args", "main"]
