"""Start-up: imports and model load, each in a fresh process, featstore against clip's own loading.

    .venv/bin/python bench/startup_bench.py [--model ViT-B/32] [--rounds 3]

Saves a random-weight checkpoint of the architecture as an fp16 state dict (openai's releases are fp16), then
times in fresh processes: ``import featstore.encode`` (torch, clip and torchvision come with it), clip's
loading of a state dict (``build_model(torch.load(...)).float()``, what ``clip.load`` does on CPU) and
featstore's ``load_model`` of the same file (which also hashes the file for the store's identity). Fastest of
ROUNDS rounds, interleaved.
"""

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from featstore.hardware import capability_line  # noqa: E402

TIMED = "import time, sys; t = time.perf_counter(); {body}; print(time.perf_counter() - t)"
CASES = {
    "import featstore.encode": "import featstore.encode",
    "clip: build_model(torch.load(...)).float()": "import torch, clip.model; t = time.perf_counter(); "
                                                 "clip.model.build_model(torch.load(sys.argv[1], weights_only=True)).float()",
    "featstore: load_model(path, 'cpu')": "import featstore.models as m; t = time.perf_counter(); m.load_model(sys.argv[1], 'cpu')",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B/32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(capability_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="featstore-startup-") as root:
        checkpoint = os.path.join(root, "model.pt")
        subprocess.run([sys.executable, "-c",
                        "import sys, torch; from featstore.models.openai import _random_state_dict; "
                        "state, _ = _random_state_dict('random:' + sys.argv[1]); "
                        "torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, sys.argv[2])",
                        args.model, checkpoint], check=True)
        times: dict[str, list[float]] = {case: [] for case in CASES}
        for _ in range(args.rounds):
            for case, body in CASES.items():
                done = subprocess.run([sys.executable, "-c", TIMED.format(body=body), checkpoint],
                                      capture_output=True, text=True, check=True)
                times[case].append(float(done.stdout))
    best = {case: min(t) for case, t in times.items()}
    for case, seconds in best.items():
        print(f"{case:45s} {seconds:5.2f} s (rounds: {', '.join(f'{t:.2f}' for t in times[case])})")
    clip_load, ours = best["clip: build_model(torch.load(...)).float()"], best["featstore: load_model(path, 'cpu')"]
    print(f"{args.model} model load: featstore {ours:.2f} s = {clip_load / ours:.2f}x as fast as clip's {clip_load:.2f} s")


if __name__ == "__main__":
    main()
