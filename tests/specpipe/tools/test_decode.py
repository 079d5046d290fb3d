"""The tools' decoding helpers and step timing (specpipe/tools/decode.py, timing.py): accepted
runs on a hand-checked mask, the KV-cache continuation against Hugging Face greedy `generate`
(with and without the kept hidden states, which are the ones a full forward gives), seeded
sampling, and the step medians."""

import torch
from transformers import AutoModelForCausalLM

from specpipe.tools.decode import accepted_runs, continue_tokens
from specpipe.tools.timing import median_step_seconds


def test_accepted_runs_by_hand():
    agree = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    # Capped at max_len = 3, and at the row's end (the last two positions of the second row).
    assert accepted_runs(agree, max_len=3).tolist() == [[2, 1, 0, 3, 3, 2, 1, 0], [3, 3, 3, 3, 3, 3, 2, 1]]
    assert accepted_runs(agree, max_len=1).tolist() == agree.long().tolist()


def test_continue_tokens_is_greedy_generate_and_keeps_the_choosing_hidden_states(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"]).eval()
    prompts = torch.tensor([[4, 8, 15, 16], [23, 42, 7, 9]])
    tokens, hidden = continue_tokens(model, prompts, 6)
    assert hidden is None
    reference = model.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert torch.equal(tokens, reference)
    kept_tokens, kept = continue_tokens(model, prompts, 6, keep_hidden=True)
    assert torch.equal(kept_tokens, tokens) and kept.shape == (2, 6, model.config.hidden_size)
    with torch.no_grad():
        full = model(tokens, output_hidden_states=True).hidden_states[-1]  # [2, 10, hidden]
    torch.testing.assert_close(kept, full[:, 3:9], atol=1e-4, rtol=1e-4)


def test_sampling_follows_the_generator(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["target"]).eval()
    prompts = torch.tensor([[4, 8, 15, 16]])
    runs = [continue_tokens(model, prompts, 8, torch.Generator().manual_seed(seed))[0] for seed in (0, 0)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, 12)
    assert torch.equal(runs[0][:, :4], prompts)


def test_median_step_seconds_times_every_named_step(tiny_models):
    target = AutoModelForCausalLM.from_pretrained(tiny_models["target"]).eval()
    draft = AutoModelForCausalLM.from_pretrained(tiny_models["draft"]).eval()
    context = torch.arange(1, 17)[None]
    medians = median_step_seconds([("ar", target, 1), ("draft", draft, 1), ("verify", target, 5)], context, 2)
    assert set(medians) == {"ar", "draft", "verify"} and all(value > 0 for value in medians.values())
