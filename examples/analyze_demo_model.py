"""Both analyses on the demo's model with two domains that differ: the standard library's
documentation (what the demo trained on) and the standard library's Python source files (not
seen in training).

    megatron-dots demo --out DEMO
    python examples/analyze_demo_model.py DEMO [--tokens 20000]

writes DEMO/domains/{docs,code}.jsonl (one document per docstring / per source file) and runs

    megatron-dots analyze experts --hf DEMO/hf --data docs=... --data code=... --out DEMO/analysis
    megatron-dots analyze ablate-shared (same flags)

with the tokenizer the demo exported next to its model.
"""

import argparse
import json
import os
import sys
import sysconfig


def _source_files(limit_bytes: int):
    """Python files of the standard library in a fixed order, up to `limit_bytes`."""
    root = sysconfig.get_paths()["stdlib"]
    total = 0
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.endswith(".py") or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        total += len(text)
        yield text
        if total >= limit_bytes:
            return


def _write_jsonl(path: str, texts) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", help="the directory of `megatron-dots demo --out DIR`")
    parser.add_argument("--tokens", type=int, default=20000, help="tokens per domain")
    parser.add_argument("--seq-length", type=int, default=64,
                        help="window length (the demo trains at 64)")
    args = parser.parse_args(argv)
    from megatron_dots.cli import main as megatron_dots
    from megatron_dots.demo import local_corpus

    domains = os.path.join(args.demo, "domains")
    os.makedirs(domains, exist_ok=True)
    docs = _write_jsonl(os.path.join(domains, "docs.jsonl"), local_corpus())
    code = _write_jsonl(os.path.join(domains, "code.jsonl"), _source_files(2_000_000))
    common = ["--hf", os.path.join(args.demo, "hf"), "--data", f"docs={docs}",
              "--data", f"code={code}", "--tokens", str(args.tokens),
              "--seq-length", str(args.seq_length), "--micro-batch-size", "16",
              "--out", os.path.join(args.demo, "analysis")]
    for analysis in ("experts", "ablate-shared"):
        print(f"$ megatron-dots analyze {analysis} {' '.join(common)}", flush=True)
        rc = megatron_dots(["analyze", analysis] + common)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
