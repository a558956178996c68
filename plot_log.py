"""Redraw a run's loss curve from its JSON-lines log, and replay the log into visdom.

    python plot_log.py checkpoints/log.jsonl                      # loss_curve.png, and visdom on 8097 if it runs
    python plot_log.py checkpoints/log.jsonl --visdom_port 8097   # visdom must answer there
    python plot_log.py checkpoints/log.jsonl --no_visdom          # only loss_curve.png

The replay fills the run's visdom env (named after the run) with the same windows the live plots
have, drawn whole, so it also mends an env that missed points while no server was running.
"""
import json
import os

from cli import ArgumentParser, UserError, atomic_write, output_file, port, run_main


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def draw_loss_curve(records, png_path):
    """Train and validation loss against thousands of images seen, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "validation"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([r["images_seen"] / 1e3 for r in train], [r["train_loss"] for r in train],
                color="tab:orange", label="train", linewidth=1)
    if val:
        ax.plot([r["images_seen"] / 1e3 for r in val], [r["val_loss"] for r in val],
                color="tab:green", marker="o", markersize=3, label="validation")
        if any("val_loss_ema" in r for r in val):
            ax.plot([r["images_seen"] / 1e3 for r in val], [r.get("val_loss_ema") for r in val],
                    color="tab:blue", marker=".", markersize=3, linestyle="--", label="validation (EMA)")
    ax.set_xlabel("thousands of images seen")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(png_path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def replay_to_visdom(records, port=8097, env=None, server="http://127.0.0.1"):
    """Send a run's log records to visdom through the same logger train.py uses. Returns the
    logger (its `online` says whether the server took everything), or None when no server answers."""
    from visdom_logger import VisdomLogger, server_answers

    if not server_answers(port, server):
        return None
    configs = [r for r in records if r.get("kind") == "config"]
    env = env or (configs[-1].get("run") if configs else None) or "main"
    logger = VisdomLogger(port=port, env=env)
    logger.autoflush = False  # one message per window instead of one per record
    for r in records:
        if r.get("kind") == "config":
            logger.log_config(r.get("config", {}))
        elif r.get("kind") == "train":
            logger.log_train(r["images_seen"], r["train_loss"], r["lr"], r["img_per_s"])
        elif r.get("kind") == "validation":
            logger.log_validation(r["images_seen"], r["val_loss"], r.get("val_loss_ema"))
    logger.flush(force=True, replace=True)
    return logger


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("log", help="a run's log.jsonl")
    parser.add_argument("--png", default=None, help="output (default: loss_curve.png beside the log)")
    parser.add_argument("--visdom_port", type=port, default=None,
                        help="replay into the visdom server on this port; it must answer (default: 8097 if it answers)")
    parser.add_argument("--visdom_env", default=None, help="visdom env (default: the run's name from the log)")
    parser.add_argument("--no_visdom", action="store_true", help="only write the PNG")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.log):
        raise UserError(f"{args.log} does not exist: pass a run's log.jsonl (in its --model_checkpoint_dir)")
    try:
        records = read_log(args.log)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{args.log} is not a JSON-lines log ({exc})") from None
    png = args.png or os.path.join(os.path.dirname(args.log), "loss_curve.png")
    output_file(png, "--png")
    draw_loss_curve(records, png)
    print(f"wrote {png}")
    if not args.no_visdom:
        visdom_port = args.visdom_port or 8097
        logger = replay_to_visdom(records, port=visdom_port, env=args.visdom_env)
        if logger is not None and logger.online:
            n = sum(r.get("kind") in ("train", "validation") for r in records)
            print(f"replayed {n} records into {logger.env_url}")
        elif args.visdom_port is not None:
            raise UserError(f"no visdom server answers on port {visdom_port}: "
                            f"start one with: bash tools/start_visdom.sh {visdom_port}")
        else:
            print(f"no visdom server on port {visdom_port}, so no replay there "
                  f"(bash tools/start_visdom.sh {visdom_port} starts one)")


if __name__ == "__main__":
    run_main(main)
