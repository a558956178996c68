"""Install visdom's front-end files from the npm registry, so that the visdom server works offline.

visdom's server downloads its JavaScript, CSS and fonts from CDNs the first time it starts and
crashes when it cannot (visdom issues #738 and #942). This script puts the same files, from the
same packages at the same versions as visdom's own `visdom/server/build.py`, into visdom's static
folder and writes `static/version.built`, which tells the server that nothing needs fetching.

    python tools/visdom_assets.py            # install, or check and return at once when done
    python tools/visdom_assets.py --check    # only verify; exit 1 when anything is missing

Each tarball is checked against the sha512 pinned below (npm's `dist.integrity`), and every
installed file against the manifest written after a complete install, so a failed or partial
fetch is an error and never a half-install marked as built. The check also reads the file list
in the installed visdom's build.py, so a visdom upgrade that needs a file this script does not
install fails here instead of in the browser. It also mends one line of visdom's index.html that
tornado >= 6.6 refuses (see INDEX_OLD). The registry can be changed with NPM_CONFIG_REGISTRY
(npm's own variable), for a mirror.
"""
import base64
import concurrent.futures
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
import urllib.request

# Run as `python tools/visdom_assets.py`, only tools/ is on the path: the shared modules are at the root.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import ArgumentParser, atomic_write, positive_int, run_main  # noqa: E402

# name, version, npm dist.integrity, {path in the package: path under static/}.
# The right-hand names are build.py's; `fonts/classnames` is what unpkg serves for a bare
# package name (its main file), and the glyphicons SVG is stored under build.py's name, which
# carries a URL fragment, and under the name that bootstrap.min.css asks for.
PACKAGES = [
    ("jquery", "3.1.1",
     "sha512-zuiWRmx65Kd1oFGdWLvAjbsumdOBFvs3r1vuqCyKFF79R7exBHNbiNEJ8LR+xkzgfxqBznMD/4Cv6PHXS6mvEw==",
     {"dist/jquery.min.js": "js/jquery.min.js"}),
    ("bootstrap", "3.3.7",
     "sha512-qcFaisBrcBhTFkz1IUnGDYnX6ZWfFzH8zOixUDtHW9Ip+r+7MfMFav2rzy7cIHc7rgIg7xjhWBoo1mS/U26j4g==",
     {"dist/js/bootstrap.min.js": "js/bootstrap.min.js",
      "dist/css/bootstrap.min.css": "css/bootstrap.min.css",
      "dist/fonts/glyphicons-halflings-regular.eot": "fonts/glyphicons-halflings-regular.eot",
      "dist/fonts/glyphicons-halflings-regular.woff2": "fonts/glyphicons-halflings-regular.woff2",
      "dist/fonts/glyphicons-halflings-regular.woff": "fonts/glyphicons-halflings-regular.woff",
      "dist/fonts/glyphicons-halflings-regular.ttf": "fonts/glyphicons-halflings-regular.ttf",
      "dist/fonts/glyphicons-halflings-regular.svg": ["fonts/glyphicons-halflings-regular.svg",
                                                      "fonts/glyphicons-halflings-regular.svg#glyphicons_halflingsregular"]}),
    ("react", "16.2.0",
     "sha512-ZmIomM7EE1DvPEnSFAHZn9Vs9zJl5A9H7el0EGTE6ZbW9FKe/14IYAlPbC8iH25YarEQxZL+E8VW7Mi7kfQrDQ==",
     {"umd/react.production.min.js": "js/react-react.min.js"}),
    ("react-dom", "16.2.0",
     "sha512-zpGAdwHVn9K0091d+hr+R0qrjoJ84cIBFL2uU60KvWBPfZ7LPSrfqviTxGHWN0sjPZb2hxWzMexwrvJdKePvjg==",
     {"umd/react-dom.production.min.js": "js/react-dom.min.js"}),
    ("react-modal", "3.1.10",
     "sha512-7b77AGWCkdg0YOf/qcYIGCpuwbxRwOA8P3UrUovk4grUNv+idOmHovJAx/Dcd3fuwHtgixxVjpcjVG60985MSA==",
     {"dist/react-modal.min.js": "js/react-modal.min.js"}),
    # build.py takes https://cdn.plot.ly/plotly-2.11.1.min.js, the file this package ships.
    ("plotly.js-dist-min", "2.11.1",
     "sha512-F9WWNht0D3yBLZGHbLoJNfvplXvy+GUPSsA/lCbMuYd/UwzSu6Vmyprxlps9Einw1LDS1hYBrJeioK0lE3ieXA==",
     {"plotly.min.js": "js/plotly-plotly.min.js"}),
    ("sjcl", "1.0.7",
     "sha512-xQbiwKfiAj6vyk44ANJ5RRymALRdRZOuRoKNYkWUU404p/RFXmMaay1Z5vRn30GJjkD+psox4Jd38jZojSuNYA==",
     {"sjcl.js": "js/sjcl.js"}),
    ("layout-bin-packer", "1.4.0",
     "sha512-dQOZnajbOBGIcS9YlzKrkRtMCGa2oEpyf1zGRn93suphSvPclJe54Sbgtb053GJ21DUk84IBzaeQvjn+Gb10fA==",
     {"dist/layout-bin-packer.js": "js/layout_bin_packer.js",
      "dist/layout-bin-packer.js.map": "js/layout-bin-packer.js.map"}),
    # build.py takes d3js.org/d3.v3.min.js and d3-selection-multi.v1.js: the last v3 and v1.
    ("d3", "3.5.17",
     "sha512-yFk/2idb8OHPKkbAL8QaOaqENNoMhIaSHZerk3oQsECwkObkCpJyjYwCe+OHiq6UEdhe1m8ZGARRRO3ljFjlKg==",
     {"d3.min.js": "js/d3.v3.min.js"}),
    ("d3-selection-multi", "1.0.1",
     "sha512-mEnRkJ6A+Otd1LuRPV3az+s/RLDmIEhuz/MnT21O2nPcWNH7wZotdIlRjMA4Wpr+n7AESQ5fD8v1J3nL2Mnw9g==",
     {"build/d3-selection-multi.js": "js/d3-selection-multi.v1.js"}),
    ("save-svg-as-png", "1.4.17",
     "sha512-7QDaqJsVhdFPwviCxkgHiGm9omeaMBe1VKbHySWU6oFB2LtnGCcYS13eVoslUgq6VZC6Tjq/HddBd1K6p2PGpA==",
     {"lib/saveSvgAsPng.js": "js/saveSvgAsPng.js"}),
    ("react-resizable", "1.4.6",
     "sha512-4zLORO51u0/mlDsrVCAA4p266d+3mb2ZMNdiWOotAh/PdnfrRzZhgePmKE08PSQatXVIfMjmyD+Sapay8tmxdQ==",
     {"css/styles.css": "css/react-resizable-styles.css"}),
    ("react-grid-layout", "0.16.3",
     "sha512-ytP92EqUjqcFhGzvdeKrK610dQ04GdFwRCWtD6PoeL5wR3liETcFISO7k8RBqnosV86JtXf/DwIfrL0COLs0gg==",
     {"css/styles.css": "css/react-grid-layout-styles.css"}),
    ("classnames", "2.2.5",
     "sha512-DTt3GhOUDKhh4ONwIJW4lmhyotQmV2LjNlGK/J2hkwUcqcbKkCLAdJPtxQnxnlc7SR3f1CEXCyMmc7WLUsWbNA==",
     {"index.js": "fonts/classnames"}),
    # MathJax: build.py fetches eight files; the page then loads further MathJax components
    # (extensions, output jax, fonts) at run time, so the run-time tree is installed too.
    ("mathjax", "2.7.5",
     "sha512-OzsJNitEHAJB3y4IIlPCAvS0yoXwYjlo2Y4kmm9KQzyIBZt2d8yKRalby3uTRNN4fZQiGL2iMXjpdP1u2Rq2DQ==",
     "mathjax"),
]
MATHJAX_DIR = "js/mathjax/2.7.5/"
# The eight files visdom's build.py asks for; each must be present.
MATHJAX_BUILD_PY = ["config/Safe.js", "config/TeX-AMS-MML_HTMLorMML.js", "extensions/Safe.js",
                    "jax/output/SVG/fonts/TeX/fontdata.js", "jax/output/SVG/jax.js",
                    "jax/output/SVG/fonts/TeX/Size1/Regular/Main.js", "jax/output/SVG/config.js",
                    "MathJax.js"]
MANIFEST = ".visdom_assets.json"

# visdom 0.2.4's index.html asks tornado for static_url("../user/style.css"), a path outside the
# static folder. Since tornado 6.6 that raises 403 and every page of the server answers 403; before,
# it only logged an error. The stylesheet is served by visdom's own /user/ route, so the page can
# name that URL directly (after the base URL, as the server's other links do). Works with any tornado.
INDEX_OLD = '{{ static_url("../user/style.css") }}'
INDEX_NEW = '{{ handler.settings["static_url_prefix"].rsplit("static/", 1)[0] }}user/style.css'


def mathjax_wanted(path):
    """MathJax's run-time files: the packed tree, without the unpacked sources and the fonts the
    page never selects (it uses the TeX fonts)."""
    top = path.split("/")[0]
    if path in ("MathJax.js", "LICENSE"):
        return True
    if top in ("config", "extensions", "localization"):
        return True
    if top == "jax":
        font = re.match(r"jax/output/[^/]+/fonts/([^/]+)/", path)
        return font is None or font.group(1) == "TeX"
    return re.match(r"fonts/HTML-CSS/TeX/(woff|otf)/", path) is not None


def spec_hash():
    return hashlib.sha256(json.dumps([PACKAGES, MATHJAX_BUILD_PY, INDEX_NEW], sort_keys=True).encode()).hexdigest()


def patch_index(static_dir):
    """Apply the index.html fix above; True when the page is (now) fixed."""
    path = os.path.join(static_dir, "index.html")
    with open(path) as f:
        page = f.read()
    if INDEX_OLD in page:
        page = page.replace(INDEX_OLD, INDEX_NEW)
        with atomic_write(path, "w") as f:
            f.write(page)
    return INDEX_OLD not in page


def fetch(name, version, integrity, registry, tries=3):
    url = f"{registry}/{name}/-/{name.split('/')[-1]}-{version}.tgz"
    algo, want = integrity.split("-", 1)
    err = None
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read()
            got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
            if got == want:
                return data
            err = f"{name}@{version}: {algo} mismatch (truncated or altered download from {url})"
        except Exception as exc:  # network errors: retry, then report one line
            err = f"{name}@{version}: cannot fetch {url} ({exc})"
        if attempt + 1 < tries:
            time.sleep(1 + attempt)
    raise RuntimeError(err)


def extract(data, files):
    """{static path: bytes} for the package's wanted members; every named member must be there."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if m.isfile() and "/" in m.name}
        if files == "mathjax":
            for path in MATHJAX_BUILD_PY:
                if path not in members:
                    raise RuntimeError(f"mathjax tarball lacks {path}")
            files = {p: MATHJAX_DIR + p for p in members if mathjax_wanted(p)}
        for src, dests in files.items():
            if src not in members:
                raise RuntimeError(f"package lacks {src}")
            content = tar.extractfile(members[src]).read()
            if len(content) != members[src].size:
                raise RuntimeError(f"{src} is truncated in the tarball")
            for dest in [dests] if isinstance(dests, str) else dests:
                out[dest] = content
    return out


def build_py_files(package_dir):
    """The static/ paths the installed visdom's server/build.py would download."""
    with open(os.path.join(package_dir, "server", "build.py")) as f:
        source = f.read()
    files = []
    for name in re.findall(r'(?:%\s*bb?|"https?://[^"]+")\s*:\s*"([^"]+)"', source):
        sub = "js" if name.endswith((".js", ".js.map")) else "css" if name.endswith(".css") else "fonts"
        files.append(f"{sub}/{name}")
    version = re.search(r'mathjax/([0-9.]+)/"', source)
    mathjax = re.findall(r'"((?:config|extensions|jax)/[^"?]+|MathJax\.js)\?', source)
    if not files or not version or not mathjax:
        raise RuntimeError(f"cannot read the file list in {package_dir}/server/build.py: update tools/visdom_assets.py")
    return files + [f"js/mathjax/{version.group(1)}/{path}" for path in mathjax]


def verify(static_dir, visdom_version, package_dir=None):
    """None when the install is complete, else the reason it is not."""
    try:
        with open(os.path.join(static_dir, MANIFEST)) as f:
            manifest = json.load(f)
        with open(os.path.join(static_dir, "version.built")) as f:
            built = f.read().strip()
    except (OSError, ValueError):
        return "not installed yet"
    if manifest.get("spec") != spec_hash():
        return "installed from a different package list"
    if built != visdom_version:
        return f"version.built says {built!r}, visdom is {visdom_version!r}"
    for path, (size, sha256) in manifest["files"].items():
        full = os.path.join(static_dir, path)
        try:
            if os.path.getsize(full) != size:
                return f"{path} has the wrong size"
            with open(full, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != sha256:
                    return f"{path} is corrupt"
        except OSError:
            return f"{path} is missing"
    try:
        with open(os.path.join(static_dir, "index.html")) as f:
            if INDEX_OLD in f.read():
                return "index.html still asks tornado for ../user/style.css"
    except OSError:
        return "index.html is missing (reinstall visdom)"
    needed = [MATHJAX_DIR + p for p in MATHJAX_BUILD_PY] + (build_py_files(package_dir) if package_dir else [])
    missing = [p for p in needed if p not in manifest["files"]]
    if missing:
        return f"{missing[0]}, which visdom's build.py asks for, is not installed by this script: update it"
    return None


def install(static_dir, visdom_version, package_dir, registry, tries=3):
    # Unmark first: an interrupted install must never look built to the server.
    for name in ("version.built", MANIFEST):
        if os.path.exists(os.path.join(static_dir, name)):
            os.remove(os.path.join(static_dir, name))
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        tarballs = list(pool.map(lambda p: fetch(p[0], p[1], p[2], registry, tries), PACKAGES))
    files = {}
    for (name, version, _, wanted), data in zip(PACKAGES, tarballs):
        try:
            files.update(extract(data, wanted))
        except (RuntimeError, tarfile.TarError) as exc:
            raise RuntimeError(f"{name}@{version}: {exc}")
    manifest = {}
    for path, content in sorted(files.items()):
        full = os.path.join(static_dir, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with atomic_write(full) as f:
            f.write(content)
        manifest[path] = [len(content), hashlib.sha256(content).hexdigest()]
    with atomic_write(os.path.join(static_dir, MANIFEST), "w") as f:
        json.dump({"spec": spec_hash(), "files": manifest}, f, indent=0)
    if not patch_index(static_dir):
        raise RuntimeError("could not fix index.html")
    reason = verify_files_only(static_dir, manifest, package_dir)
    if reason:
        raise RuntimeError(reason)
    with atomic_write(os.path.join(static_dir, "version.built"), "w") as f:
        f.write(visdom_version)
    return len(manifest), sum(size for size, _ in manifest.values())


def verify_files_only(static_dir, manifest, package_dir):
    for path in build_py_files(package_dir):
        if path not in manifest:
            return f"{path}, which visdom's build.py asks for, is not installed by this script: update it"
    for path, (size, _) in manifest.items():
        full = os.path.join(static_dir, path)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            return f"{path} did not install completely"
    return None


def visdom_static_and_version():
    """visdom's package folder and version, read without importing visdom (as the server does)."""
    import importlib.util
    spec = importlib.util.find_spec("visdom")
    if spec is None or spec.origin is None:
        raise RuntimeError("visdom is not installed in this Python: run bash install.sh")
    package = os.path.dirname(spec.origin)
    try:
        with open(os.path.join(package, "VERSION")) as f:
            version = f.read().strip()
    except OSError:
        version = "no_version_file"
    return package, version


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only verify the installed files")
    parser.add_argument("--static_dir", default=None,
                        help="install here instead of visdom's static folder (for tests)")
    parser.add_argument("--tries", type=positive_int, default=3, help="attempts per download")
    args = parser.parse_args(argv)
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    try:
        package_dir, version = visdom_static_and_version()
        static_dir = args.static_dir or os.path.join(package_dir, "static")
        reason = verify(static_dir, version, package_dir)
        if reason is None:
            print(f"visdom_assets: front-end files for visdom {version} are complete in {static_dir}")
            return 0
        if args.check:
            print(f"visdom_assets: incomplete: {reason}; run: python tools/visdom_assets.py", file=sys.stderr)
            return 1
        print(f"visdom_assets: installing visdom's front-end files from {registry} ({reason})")
        os.makedirs(static_dir, exist_ok=True)
        count, size = install(static_dir, version, package_dir, registry, args.tries)
        print(f"visdom_assets: installed {count} files ({size / 1e6:.1f} MB) into {static_dir}")
        return 0
    except Exception as exc:
        print(f"visdom_assets: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    run_main(main)
