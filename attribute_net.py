"""The attribute network: reads from a 32x32 avatar the options DiceBear drew it with.

Every image of the default data set comes with its labels (images/avatars.py writes labels.csv
beside the images): skin colour, hair colour, hair style, eyes, eyebrows, mouth, and whether
glasses, earrings and details (a birthmark, blush, freckles or a mustache) are drawn. A small
convolutional network trained on them gives evaluate.py two things that need no downloaded weights:
- a feature space that knows what an avatar is (the penultimate layer), for a Frechet distance in
  the role Inception plays for FID;
- one classification head per attribute, for verdicts such as "skin colours are 40/30/20/10%".

The weights are ours: train_attribute_net.py trains them, and models/attribute_net.pt (half
precision, loaded with weights_only=True, its sha256 checked against models/attribute_net.pt.sha256)
is committed.
"""
import os

import sys

import torch
import torch.nn as nn
from tqdm import tqdm

from cli import UserError, atomic_write, check_sha256, write_sha256

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "attribute_net.pt")
FORMAT = "attribute_net/1"
# The attributes, in the order of labels.csv's columns. The optional parts are read as present or not.
ATTRIBUTES = ("skin_color", "hair_color", "hair", "eyes", "eyebrows", "mouth", "glasses", "earrings", "details")
OPTIONAL = ("glasses", "earrings", "details")
ABSENT = "none"  # labels.csv's value for an optional part that is not drawn
PRESENCE = ("absent", "present")  # an optional part's classes


def head_classes(values):
    """{attribute: its head's classes} from every value each labels.csv column can take
    (images/avatars.py's ATTRIBUTES). An optional part's head reads only whether it is drawn; the
    bald hair style's hair colour "none" stays a class of hair_color."""
    return {name: list(PRESENCE) if name in OPTIONAL else list(values[name]) for name in ATTRIBUTES}


class GlobalAveragePool(nn.Module):
    """Mean over the pixels, N x C x H x W -> N x C. Unlike nn.AdaptiveAvgPool2d, its backward pass
    is deterministic on CUDA, so training is reproducible there too."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


class AttributeNet(nn.Module):
    """Four stages of two 3x3 convolutions (BatchNorm, ReLU), the last three starting with a stride
    of 2: 32 -> 16 -> 8 -> 4 pixels. Global average pooling gives the features, and one linear head
    per attribute its logits. `classes` maps each attribute to its list of values."""

    def __init__(self, classes, width=32):
        super().__init__()
        self.classes = {name: list(values) for name, values in classes.items()}
        widths = (width, 2 * width, 4 * width, 8 * width)
        layers, c_in = [], 3
        for i, c_out in enumerate(widths):
            for j in range(2):
                stride = 2 if i > 0 and j == 0 else 1
                layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU(inplace=True)]
                c_in = c_out
        self.trunk = nn.Sequential(*layers, GlobalAveragePool())
        self.feature_dim = c_in
        self.heads = nn.ModuleDict({name: nn.Linear(c_in, len(values)) for name, values in self.classes.items()})

    def forward(self, x):
        """x: float images in [-1, 1], N x 3 x 32 x 32 -> (features N x D, {attribute: logits N x K})."""
        features = self.trunk(x)
        return features, {name: head(features) for name, head in self.heads.items()}


def to_input(images_uint8):
    return images_uint8.float() / 127.5 - 1


@torch.no_grad()
def read_images(net, images_uint8, device="cpu", batch_size=500, desc=None):
    """(features float64 N x D, {attribute: class probabilities float64 N x K}) of uint8 images;
    with a progress bar on stderr when `desc` names it."""
    net.eval()
    features, probabilities = [], {name: [] for name in net.classes}
    for i in tqdm(range(0, len(images_uint8), batch_size), desc=desc, disable=desc is None, file=sys.stderr):
        f, logits = net(to_input(images_uint8[i:i + batch_size].to(device)))
        features.append(f.double().cpu())
        for name, z in logits.items():
            probabilities[name].append(z.double().softmax(dim=1).cpu())
    return torch.cat(features), {name: torch.cat(p) for name, p in probabilities.items()}


# ---- the weights file: one small file, weights_only, with its sha256 beside it -------------------

def save(path, net, info):
    """Half-precision weights, the classes and `info` (accuracies, reliable heads, how it was
    trained) in one file; its sha256 in path + ".sha256"."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, "classes": net.classes, "width": net.trunk[0].out_channels,
                    "state_dict": state, "info": info}, f)
    write_sha256(path)


def load(path=WEIGHTS, device="cpu"):
    """(network in eval mode, info). The file's sha256 must match the one recorded beside it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no attribute network here; it is committed with the repository "
                        f"(git checkout models/), or train one with python train_attribute_net.py")
    check_sha256(path, "restore it (git checkout models/) or retrain with python train_attribute_net.py")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read the attribute network ({type(e).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise UserError(f"{path}: not an attribute network of this project (format {FORMAT})")
    net = AttributeNet(saved["classes"], width=saved["width"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in saved["state_dict"].items()})
    # channels_last: 1.7x faster on a CPU (oneDNN), equal to float32 rounding.
    return net.to(device, memory_format=torch.channels_last).eval(), saved["info"]


def class_index(net, name, values):
    """Label strings of one attribute (labels.csv) -> class indices; optional parts -> 0 absent, 1 present."""
    if name in OPTIONAL:
        return torch.tensor([int(v != ABSENT) for v in values])
    lookup = {v: i for i, v in enumerate(net.classes[name])}
    return torch.tensor([lookup[v] for v in values])
