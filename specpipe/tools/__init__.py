"""Offline tools: building the demo pair and training the acceptance-length predictor.

Nothing at run time imports this package (tests/test_layering.py holds that): serving needs only
what these tools write (the weights under specpipe/assets/demo, `accept_predictor.*` beside the
target), found by specpipe/demo_pair.py and loaded by specpipe/predictor.py. The one exception is
deliberate and lazy: `demo_pair_dir()` builds the pair on first use when it is neither shipped
nor cached. The commands are `specpipe build-demo` and `specpipe train-predictor` (launch/cli.py).

- corpus.py: the training text (the standard library's source) and its tokenizer.
- decode.py: greedy / sampled continuation with a KV cache, and accepted-run counting.
- timing.py: median forward-step costs with a warm KV cache (also used by `specpipe bench`).
- lm_training.py: Llama models, their training loop and the draft's distillation.
- build_demo.py: the demo-pair recipe, its measurements and build_info.json.
- train_predictor.py: the predictor's dataset, fit and metrics.

Like the rest of the shared core, these modules know nothing of the processes (coordinator,
workers, launch).
"""
