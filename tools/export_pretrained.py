"""Write a run's checkpoint as the repository's pretrained model: its EMA weights in half precision,
with its configuration and how it was trained, and its sha256 beside it (checkpoint.export_pretrained).
generate.py and evaluate.py sample it when no checkpoints/latest_model.pth exists yet.

    python tools/export_pretrained.py --checkpoint RUN/latest_model.pth \
        --trained_by "bash ablate.sh --scale cpu --only baseline --seeds 0" --machine "AMD EPYC (Zen 4), 2 cores"
"""
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import PRETRAINED, export_pretrained, read  # noqa: E402
from cli import ArgumentParser, UserError, output_file, run_main, write_sha256  # noqa: E402

MAX_BYTES = 10 * 1024 * 1024  # what the repository carries


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="the run's checkpoint (train.py's latest_model.pth)")
    parser.add_argument("--out", default=os.path.relpath(PRETRAINED), help="default: %(default)s")
    parser.add_argument("--trained_by", required=True, help="the command that trained it, as a user would rerun it")
    parser.add_argument("--machine", required=True, help="what it trained on, e.g. 'AMD EPYC (Zen 4), 2 cores, bf16'")
    parser.add_argument("--note", default="", help="anything else a user should know")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    output_file(args.out, "--out")
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"--out {args.out} exists: pass --overwrite to replace it")
    source = read(args.checkpoint)
    info = {"trained_by": args.trained_by, "machine": args.machine, "note": args.note,
            "images_seen": source["step"] * source["config"]["batch_size"],
            "exported": datetime.date.today().isoformat()}
    # Written beside --out first, so that a file too large to carry never replaces the one there.
    draft = os.path.join(os.path.dirname(os.path.abspath(args.out)), f".{os.path.basename(args.out)}.draft")
    export_pretrained(args.checkpoint, draft, info)
    size = os.path.getsize(draft)
    if size > MAX_BYTES:
        os.remove(draft)
        os.remove(draft + ".sha256")
        raise UserError(f"--checkpoint {args.checkpoint}: its weights take {size / 2**20:.1f} MB in half precision, "
                        f"more than the {MAX_BYTES / 2**20:.0f} MB the repository carries: export a smaller network")
    os.replace(draft, args.out)
    write_sha256(args.out)  # of the same bytes, under --out's name
    os.remove(draft + ".sha256")
    print(f"wrote {args.out} ({size / 2**20:.2f} MB) and {args.out}.sha256: {info['images_seen']:,} images seen, "
          f"{(source.get('train_seconds') or 0) / 60:.1f} minutes of training")
    return 0


if __name__ == "__main__":
    run_main(main)
