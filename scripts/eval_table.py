"""Markdown tables of mean PSNR / SSIM from the per-image CSVs of `python -m eamamba_ref.evaluate --csv`.

    python scripts/eval_table.py docs/eval

Reads every `*.csv` in the folder; files named `SET_sigmaS_*.csv` (denoising: the baselines from a
`--no-model` run and the model from a `--baselines none` run, merged per method) and `SET_sr2*.csv`
(x2 SR). Prints one table per task, best PSNR per row in bold, and exits 1 if a denoising row has
no EAMamba result or a method saw a different number of images than another.
"""
import csv
import glob
import os
import re
import sys
from collections import defaultdict

DENOISE_COLUMNS = ["noisy input", "TV", "wavelet", "NL-means", "BM3D / CBM3D", "EAMamba"]
# BM3D (gray sets) and CBM3D (colour sets) share a column: a row holds one of them
SAME_COLUMN = {"BM3D": "BM3D / CBM3D", "CBM3D": "BM3D / CBM3D"}
SR_COLUMNS = ["bicubic", "EAMamba"]


def read_rows(folder):
    """{(set, sigma or None): {method: [(psnr, ssim), ...]}} from the folder's CSVs. A row seen in two
    files (the noisy input is in both runs; same seeded noise) counts once."""
    groups = defaultdict(lambda: defaultdict(dict))
    for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
        name = os.path.basename(path)
        m = re.match(r"(.+?)_sigma(\d+)", name)
        if m:
            key = (m.group(1), int(m.group(2)))
        elif re.match(r"(.+?)_sr2", name):
            key = (name.split("_sr2")[0], None)
        else:
            continue
        for row in csv.DictReader(open(path)):
            method = SAME_COLUMN.get(row["method"], row["method"])
            groups[key][method][row["image"]] = (float(row["psnr"]), float(row["ssim"]))
    return {key: {m: list(per_image.values()) for m, per_image in methods.items()}
            for key, methods in groups.items()}


def table(groups, denoise):
    columns = DENOISE_COLUMNS if denoise else SR_COLUMNS
    head = "| set (images) | σ | " if denoise else "| set (images) | "
    lines = [head + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + (2 if denoise else 1))]
    ok = True
    for (name, sigma), methods in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        if (sigma is not None) != denoise:
            continue
        counts = {len(v) for v in methods.values()}
        if len(counts) != 1 or "EAMamba" not in methods:
            ok = False
        means = {m: (sum(p for p, _ in v) / len(v), sum(s for _, s in v) / len(v)) for m, v in methods.items()}
        best = max(p for m, (p, _) in means.items() if m != "noisy input")
        cells = []
        for m in columns:
            if m not in means:
                cells.append("–")
                continue
            p, s = means[m]
            text = f"{p:.2f} / {s:.3f}"
            cells.append(f"**{text}**" if p == best else text)
        n = max(counts)
        prefix = f"| {name} ({n}) | {sigma} | " if denoise else f"| {name} ({n}) | "
        lines.append(prefix + " | ".join(cells) + " |")
    return "\n".join(lines), ok


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python scripts/eval_table.py FOLDER_OF_CSVS", file=sys.stderr)
        return 2
    groups = read_rows(argv[0])
    ok = True
    for denoise, title in ((True, "Denoising, mean PSNR (dB) / SSIM (RGB; '_gray' sets: gray)"), (False, "x2 SR, mean PSNR (dB) / SSIM, Y channel, border 2")):
        text, good = table(groups, denoise)
        ok &= good
        print(f"{title}:\n\n{text}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
