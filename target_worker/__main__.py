"""`python -m specpipe.target_worker --model DIR [--host H --port P --device D --dtype T]`."""

from specpipe.launch.worker import main

if __name__ == "__main__":
    main("target")
