"""How often a seeded draw depends on what shares the batch: `python -m specpipe.launch.batch_rounding`
(the demo target; `--model DIR` for another).

A model loaded and laid out as a target worker does it (build_engine: weight layout, prepacked
copies, the KV store) runs one row's tokens alone, then packed with other sequences' rows, as the
target's batches mix requests. The logits of the same row can then differ in their last bits (a
matrix multiply blocks its work by the row count). Reported: the share of rows whose logits
differ at all, the largest difference, and, over those rows, how many of the same seeded draws
come out different by an inverse CDF (one uniform per draw) and by the two-stage exponential race
that specpipe.sampling draws by (`sample_from_probs`). Everything is seeded: a rerun on
the same machine prints the same figures.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import torch

PREFIX = 32  # tokens of each sequence prefilled before the trials (the rows verify after them)


@dataclass
class Rounding:
    rows: int = 0  # rows compared, alone against batched
    rows_differing: int = 0  # rows whose logits differ in any bit
    max_logit_difference: float = 0.0
    draws: int = 0  # seeded draws made on the differing rows, by each rule
    inverse_cdf_flips: int = 0
    race_flips: int = 0


def target_like(model_dir: str):
    """(model, KV store) as a target worker builds them, on the CPU with one thread."""
    from specpipe.config import WorkerConfig
    from specpipe.launch.worker import build_engine
    from specpipe.models import load_model

    torch.set_num_threads(1)
    config = WorkerConfig(
        role="target",
        model=model_dir,
        bind="inproc://batch-rounding",
        data_bind="inproc://batch-rounding-data",
        kv_slots=8,
        max_seq_len=PREFIX + 16,
    )
    model = load_model(model_dir, device="cpu", dtype="float32")
    engine, _ = build_engine(config, model, torch.device("cpu"))
    engine.receiver.socket.close(0)  # (the data plane is not used here)
    return model, engine.store


def measure(model, store, sequences: list[list[int]], trials: int, draws_per_row: int, seed: int = 0) -> Rounding:
    """`sequences`: at least two, each PREFIX + 8 tokens or more, one per KV slot."""
    from specpipe.kv_store import Row, forward_packed
    from specpipe.sampling import make_generator, sample_from_probs

    def logits(rows: list[tuple[int, list[int]]]) -> torch.Tensor:
        packed = [Row(slot, PREFIX, len(ids)) for slot, ids in rows]
        flat = torch.tensor([token for _, ids in rows for token in ids])
        with torch.inference_mode():
            return forward_packed(model, store, packed, flat, list(range(len(flat)))).logits

    with torch.inference_mode():
        for slot, ids in enumerate(sequences):
            forward_packed(model, store, [Row(slot, 0, PREFIX)], torch.tensor(ids[:PREFIX]), [PREFIX - 1])
    pick, result = random.Random(seed), Rounding()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(trials):
        slot = pick.randrange(len(sequences))
        block = sequences[slot][PREFIX : PREFIX + pick.randint(1, 8)]
        others = pick.sample([s for s in range(len(sequences)) if s != slot], pick.randint(1, len(sequences) - 1))
        alone = logits([(slot, block)])
        batched = logits([(slot, block)] + [(s, sequences[s][PREFIX : PREFIX + pick.randint(1, 8)]) for s in others])
        batched = batched[: len(block)]
        differ = (alone != batched).any(-1)
        result.rows += len(block)
        result.rows_differing += int(differ.sum())
        result.max_logit_difference = max(result.max_logit_difference, float((alone - batched).abs().max()))
        for a, b in zip(alone[differ], batched[differ]):
            p, q = torch.softmax(a, -1), torch.softmax(b, -1)
            uniforms = torch.rand(draws_per_row, generator=generator, dtype=torch.float64)
            cdf_p, cdf_q = p.double().cumsum(-1), q.double().cumsum(-1)
            flips = torch.searchsorted(cdf_p, uniforms * cdf_p[-1], right=True) != torch.searchsorted(
                cdf_q, uniforms * cdf_q[-1], right=True
            )
            race_seed = int(torch.randint(1 << 62, (1,), generator=generator))
            raced = [sample_from_probs(w.expand(draws_per_row, -1), make_generator(race_seed)) for w in (p, q)]
            result.inverse_cdf_flips += int(flips.sum())
            result.race_flips += int((raced[0] != raced[1]).sum())
            result.draws += draws_per_row
    return result


def main(argv=None) -> None:
    from specpipe.demo_files import DEMO_DIR
    from specpipe.demo_pair import load_heldout_prompts
    from specpipe.models import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_DIR / "target"), help="a causal LM folder")
    parser.add_argument("--trials", type=int, default=200, help="rows run alone and batched")
    parser.add_argument("--draws", type=int, default=2_000, help="seeded draws per differing row, by each rule")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    ids = [token for prompt in load_heldout_prompts() for token in tokenizer(prompt)["input_ids"]]
    width = PREFIX + 8
    sequences = [ids[i * width : (i + 1) * width] for i in range(min(8, len(ids) // width))]
    model, store = target_like(args.model)
    result = measure(model, store, sequences, args.trials, args.draws)
    print(
        f"{result.rows_differing} of {result.rows} rows ({result.rows_differing / max(1, result.rows):.1%}) "
        f"had other logits batched than alone (largest difference {result.max_logit_difference:.1e})"
    )
    if result.draws:
        print(
            f"of {result.draws:,} seeded draws on those rows, an inverse CDF flipped {result.inverse_cdf_flips} "
            f"({result.inverse_cdf_flips / result.draws:.1e} per draw), the exponential race {result.race_flips}"
        )


if __name__ == "__main__":
    main()
