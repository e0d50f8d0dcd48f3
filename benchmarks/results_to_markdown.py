"""Print the benchmark results in benchmarks/results/ as the Markdown tables the
README shows, so that the README is refreshed from measurements, never by hand.

    python benchmarks/results_to_markdown.py [--device cpu] [--dtype float32]
"""
import argparse
import json
import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _ms(r):
    if not r["seconds"]:
        return r["note"].split(":")[0]
    v = r["seconds"] * 1e3
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def _mib(r):
    if r["peak_bytes"] is None:
        return "-"
    v = r["peak_bytes"] / 2**20
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def op_table(path, impls):
    data = json.load(open(path))
    groups = {}
    for r in data["results"]:
        groups.setdefault((r["mode"], r["shape"]), {})[r["impl"]] = r
    impls = [i for i in impls if any(i in g for g in groups.values())]
    lines = ["| mode | B x C x H x W | " + " | ".join(f"{i} ms | {i} MiB" for i in impls)
             + " | speed-up | memory vs reference |",
             "|" + "---|" * (2 + 2 * len(impls) + 2)]
    for (mode, shape), g in groups.items():
        cells = []
        for i in impls:
            cells += [_ms(g[i]), _mib(g[i])] if i in g else ["-", "-"]
        ours, ref = g.get("danet_ext"), g.get("reference")
        speed = f"{ref['seconds'] / ours['seconds']:.2f}x" if ours and ref and ref["seconds"] and ours["seconds"] else "-"
        mem = (f"{ours['peak_bytes'] / ref['peak_bytes']:.1%}"
               if ours and ref and ours["peak_bytes"] and ref["peak_bytes"] else "-")
        lines.append(f"| {mode} | {shape} | " + " | ".join(cells) + f" | {speed} | {mem} |")
    return "\n".join(lines), data["machine"]


def inference_table(path):
    """bench_inference.py's results: one row per path and size."""
    data = json.load(open(path))
    lines = ["| image | path | time per forward (s) | first call (s) | peak extra memory (GiB) |",
             "|---|---|---|---|---|"]
    for r in data["results"]:
        if "seconds" in r:
            lines.append(f"| {r['size']} | {r['path']} | {r['seconds']:.2f} | {r['first_call_seconds']:.2f} | "
                         f"{r['peak_extra_gib']:.2f} |")
        else:
            lines.append(f"| {r['size']} | {r['path']} | {r.get('skipped') or r.get('failed')} | - | - |")
    return "\n".join(lines), data["machine"]


def describe(machine):
    isa = ", ".join(machine.get("isa", [])) or "ISA flags not recorded"
    return f"{machine.get('gpu', machine['cpu'])} ({isa}), {machine['cores']} cores, torch {machine['torch']}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--results", default=HERE)
    args = p.parse_args()
    for op, impls in (("pam", ["danet_ext", "reference", "reference_compiled", "sdpa", "sdpa_8head"]),
                      ("cam", ["danet_ext", "reference", "reference_compiled"])):
        path = os.path.join(args.results, f"{op}_{args.device}_{args.dtype}.json")
        if os.path.exists(path):
            table, machine = op_table(path, impls)
            print(f"### {op} ({args.device}, {args.dtype}) on {describe(machine)}\n\n{table}\n")
    inference = os.path.join(args.results, f"inference_{args.device}.json")
    if os.path.exists(inference):
        table, machine = inference_table(inference)
        print(f"### full DANet-ResNet-101 inference ({args.device}) on {describe(machine)}\n\n{table}\n")


if __name__ == "__main__":
    main()
