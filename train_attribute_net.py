"""Train the attribute network (attribute_net.py) on the train set's labels, check it on the test set's.

    python train_attribute_net.py                        # models/attribute_net.pt and docs/attribute_net.md
    python train_attribute_net.py --device cuda --epochs 8 --out /tmp/attribute_net.pt --doc /tmp/attribute_net.md

Both folders need their labels.csv (images/avatars.py writes it; for a folder made before labels:
python images/avatars.py --labels_only --dest_image_dir DIR). One head per attribute, trained with
the sum of the heads' cross-entropies. Each head's held-out accuracy on the test set is set against
chance: always answering the test set's most frequent class. A head is *reliable* when it reaches
RELIABLE_ACCURACY and makes at most half the errors of chance (RELIABLE_ERROR_SHARE), so that a
presence head cannot pass by answering "absent" to a part that is drawn 10% of the time. Heads that
fail are still reported, and left out of the summary numbers. (The eyes, a few pixels at 32x32, are
the hardest head: 0.977 for the committed network, against 1.000 for skin, hair and mouth.)

The defaults made the committed network: width 32 (1.2M parameters, a 2.4 MB file), 6 epochs of all
50,000 train images, about 11 minutes on 2 CPU cores (epochs of about 110 s) when nothing else runs.

The same flags and seed give the same weights on the CPU (bit for bit, with the same number of
threads); on a GPU, deterministic algorithms are switched on for the same reason. The weights are
saved in half precision with their sha256 beside them (attribute_net.save), with `info`: the
accuracies, chance, the reliable heads and how the file was made.
"""
import contextlib
import datetime
import math
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import attribute_net
from attribute_net import AttributeNet, to_input
from cli import (ArgumentParser, UserError, atomic_write, non_negative_float, output_file, pick_device, positive_float,
                 positive_int, random_seed, run_main)
from dataset import image_files, load_image_folder

# images/ is not a package: avatars.py owns labels.csv (its columns, its values, its reader).
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "images"))
import avatars  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))

RELIABLE_ACCURACY = 0.9
RELIABLE_ERROR_SHARE = 0.5  # at most this share of chance's error rate
RELIABLE_RULE = f"held-out accuracy >= {RELIABLE_ACCURACY} and error <= {RELIABLE_ERROR_SHARE:g} x chance's error"


def is_reliable(accuracy, chance):
    return accuracy >= RELIABLE_ACCURACY and 1 - accuracy <= RELIABLE_ERROR_SHARE * (1 - chance) + 1e-12


def parse_args(argv):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--train_dir", default="images/train_images_downsample", help="train images and labels.csv")
    parser.add_argument("--test_dir", default="images/test_images_downsample", help="held-out images and labels.csv")
    parser.add_argument("--train_images", type=positive_int, default=None,
                        help="train on the first N images of --train_dir only (default: all)")
    parser.add_argument("--epochs", type=positive_int, default=6)
    parser.add_argument("--batch_size", type=positive_int, default=128)
    parser.add_argument("--width", type=positive_int, default=32, help="channels of the first stage (then x2, x4, x8)")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW's peak learning rate")
    parser.add_argument("--weight_decay", type=non_negative_float, default=1e-4)
    parser.add_argument("--seed", type=random_seed, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    parser.add_argument("--num_threads", type=positive_int, default=None,
                        help="CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--out", default=attribute_net.WEIGHTS, help="the weights file (its sha256 goes beside it)")
    parser.add_argument("--doc", default="docs/attribute_net.md", help="the Markdown report of the held-out accuracies")
    args = parser.parse_args(argv)
    output_file(args.out, "--out")
    output_file(args.doc, "--doc")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = pick_device(args.device)
    with reproducible(device, args.num_threads):
        train(args, argv, device)


def train(args, argv, device):
    # ---- set-up: the data, its labels as class indices, the network ---------------------------
    torch.manual_seed(args.seed)
    classes = attribute_net.head_classes(avatars.ATTRIBUTES)
    net = AttributeNet(classes, width=args.width)
    train_images, train_labels = load_labelled_folder(args.train_dir, "--train_dir")
    if args.train_images is not None:
        train_images = train_images[:args.train_images]
        train_labels = {name: values[:args.train_images] for name, values in train_labels.items()}
    test_images, test_labels = load_labelled_folder(args.test_dir, "--test_dir")
    train_targets = {name: attribute_net.class_index(net, name, train_labels[name]) for name in classes}
    test_targets = {name: attribute_net.class_index(net, name, test_labels[name]) for name in classes}
    num_train = len(train_images)
    if num_train < args.batch_size:
        raise UserError(f"--batch_size {args.batch_size} is more than the {num_train} train images; lower it")
    num_parameters = sum(p.numel() for p in net.parameters())
    print(f"attribute net: width {args.width}, {num_parameters:,} parameters, {len(classes)} heads; "
          f"{num_train} train and {len(test_images)} test images; {args.epochs} epochs of batch {args.batch_size} "
          f"on {device} ({torch.get_num_threads()} CPU threads)")

    net = net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = num_train // args.batch_size  # the last partial batch is dropped (BatchNorm)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = max(1, total_steps // 20)

    def lr_at(step):
        # Linear warm-up over the first 5% of the steps, then cosine decay to 0.
        if step < warmup_steps:
            return args.lr * (step + 1) / warmup_steps
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))

    # ---- the loop ------------------------------------------------------------------------------
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    epoch_seconds = []
    progress = tqdm(total=total_steps, unit="step", desc="attribute net")
    step = 0
    for epoch in range(args.epochs):
        epoch_started = time.time()
        net.train()
        order = torch.randperm(num_train, generator=generator)
        for i in range(steps_per_epoch):
            batch = order[i * args.batch_size:(i + 1) * args.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            _, logits = net(to_input(train_images[batch].to(device)))
            loss = sum(F.cross_entropy(logits[name], train_targets[name][batch].to(device)) for name in classes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            progress.update(1)
            if step % 20 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch + 1)
        epoch_seconds.append(time.time() - epoch_started)
        accuracy = held_out_accuracy(net, test_images, test_targets, device)
        progress.write(f"epoch {epoch + 1}: {epoch_seconds[-1]:.0f} s, loss {loss.item():.3f}, held-out accuracy "
                       + ", ".join(f"{name} {a:.3f}" for name, a in accuracy.items()))
    progress.close()
    train_seconds = time.time() - started

    # ---- the verdict: each head against chance, with the weights rounded as the file holds them ---
    net = net.half().float()
    accuracy = held_out_accuracy(net, test_images, test_targets, device)
    chance = {name: torch.bincount(t, minlength=len(classes[name])).max().item() / len(t)
              for name, t in test_targets.items()}
    reliable = [name for name in classes if is_reliable(accuracy[name], chance[name])]

    # ---- the file and its report -----------------------------------------------------------------
    info = {
        "held_out_accuracy": accuracy,
        "chance": chance,
        "reliable": reliable,
        "reliable_rule": RELIABLE_RULE,
        "num_parameters": num_parameters,
        "epochs": args.epochs, "batch_size": args.batch_size, "width": args.width, "lr": args.lr,
        "weight_decay": args.weight_decay, "seed": args.seed,
        "train_dir": args.train_dir, "test_dir": args.test_dir,
        "train_images": num_train, "test_images": len(test_images),
        "train_seconds": round(train_seconds, 1), "epoch_seconds": [round(s, 1) for s in epoch_seconds],
        "command": shlex.join(["python", "train_attribute_net.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device), "machine": machine(device),
        "torch": str(torch.__version__),  # TorchVersion would not load with weights_only
    }
    attribute_net.save(args.out, net.cpu(), info)
    write_report(args.doc, args.out, classes, info)
    print(f"wrote {shown(args.out)} ({os.path.getsize(args.out) / 1e6:.2f} MB), its .sha256 and {args.doc}")
    print(f"reliable heads ({len(reliable)} of {len(classes)}): {', '.join(reliable) or 'none'}")


# ---- helpers -----------------------------------------------------------------------------------

@contextlib.contextmanager
def reproducible(device, num_threads):
    """Deterministic algorithms (and num_threads CPU threads) inside the block; torch's global
    settings as they were afterwards, so that a test can call main in-process."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        # cuBLAS is deterministic only with this workspace setting, read at its first call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def load_labelled_folder(directory, flag):
    """(uint8 images N x 3 x 32 x 32, {attribute: N label strings}) of a folder and its labels.csv."""
    names = [os.path.basename(p) for p in image_files(directory)]
    labels_path = os.path.join(directory, avatars.LABELS_FILE)
    relabel = f"python images/avatars.py --labels_only --dest_image_dir {directory}"
    if not os.path.isfile(labels_path):
        raise UserError(f"{flag} {directory}: no {avatars.LABELS_FILE}; write it with {relabel}")
    rows = avatars.read_labels(labels_path)  # only the rows it can trust
    missing = [n for n in names if n not in rows]
    if missing:
        raise UserError(f"{flag} {directory}: {avatars.LABELS_FILE} has no valid row for {len(missing)} of the "
                        f"{len(names)} images (e.g. {missing[0]}); rewrite it with {relabel}")
    images = load_image_folder(directory)  # in image_files' order, like `names`
    return images, {name: [rows[n][name] for n in names] for name in attribute_net.ATTRIBUTES}


def held_out_accuracy(net, images, targets, device):
    _, probabilities = attribute_net.read_images(net, images, device)
    return {name: (p.argmax(dim=1) == targets[name]).double().mean().item() for name, p in probabilities.items()}


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def shown(path):
    """A path as the report shows it: relative to the repository when inside it."""
    relative = os.path.relpath(os.path.abspath(path), REPO)
    return path if relative.startswith("..") else relative


def write_report(path, weights_path, classes, info):
    accuracy, chance, reliable = info["held_out_accuracy"], info["chance"], info["reliable"]
    rows = "\n".join(
        f"| {name} | {'present or not' if name in attribute_net.OPTIONAL else len(values)} | {accuracy[name]:.3f} "
        f"| {round((1 - accuracy[name]) * info['test_images'])} | {chance[name]:.3f} | "
        f"{'yes' if name in reliable else 'no'} |"
        for name, values in classes.items())
    mean_reliable = sum(accuracy[n] for n in reliable) / len(reliable) if reliable else float("nan")
    minutes = info["train_seconds"] / 60
    text = f"""# The attribute network

`{shown(weights_path)}` ({os.path.getsize(weights_path) / 1e6:.2f} MB, half precision,
{info['num_parameters']:,} parameters, width {info['width']}) reads from a 32x32 avatar the options
DiceBear drew it with: one head per attribute of `labels.csv` (images/avatars.py); the optional parts
(glasses, earrings, details) are read as present or absent. The network, its file format and
`read_images` are in attribute_net.py; this file was written by train_attribute_net.py.

## Held-out accuracy

On the {info['test_images']:,} images of `{info['test_dir']}`, which share no avatar with the train set.
Chance is always answering the test set's most frequent class. These are clean renders: on a
generated image that draws a part halfway, a head still answers with the nearest class.

| head | classes | held-out accuracy | errors | chance | reliable? |
|---|---|---|---|---|---|
{rows}

A head is **reliable** when its held-out accuracy is at least {RELIABLE_ACCURACY} and its error is at most
{RELIABLE_ERROR_SHARE:g} times chance's error (so a part drawn 10% of the time needs 0.95). The rule was
fixed before training; the weights are the last epoch's (the test set chooses nothing). Unreliable
heads are reported here and left out of the summary numbers.
Mean held-out accuracy of the {len(reliable)} reliable heads: {mean_reliable:.3f}.

## How it was made

```
{info['command']}
```

{info['train_images']:,} train images of `{info['train_dir']}`, {info['epochs']} epochs, batch {info['batch_size']},
AdamW (learning rate {info['lr']:g} with 5% warm-up and cosine decay, weight decay {info['weight_decay']:g}),
the sum of the heads' cross-entropies, seed {info['seed']}. Training took {minutes:.1f} minutes (epochs of
{', '.join(f'{s:.0f}' for s in info['epoch_seconds'])} s) on {info['device']}: {info['machine']}, torch
{info['torch']}, {info['date']}. The same command on the same CPU and thread count gives the same weights.

`attribute_net.load()` checks the file against `{os.path.basename(weights_path)}.sha256` and opens it with
`torch.load(..., weights_only=True)`; `info` in the file holds every number above.
"""
    with atomic_write(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    run_main(main)
