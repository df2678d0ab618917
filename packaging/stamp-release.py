#!/usr/bin/env python3
"""Stamp the release coordinates into the chart, the kustomize base and the compose file.

The image repository and the chart's home are named in one place, the release workflow, which
derives them from the GitHub repository it runs in (ghcr.io/<owner>/mailfront). The files in the
repository carry the placeholder "example"; this script rewrites them before packaging:

    packaging/stamp-release.py --repository https://github.com/OWNER/mailfront \
        --image ghcr.io/owner/mailfront --version 1.2.3

- helm/mailfront/Chart.yaml: home, sources, the mailfront/image annotation (image.repository's
  default) and appVersion (image.tag's default);
- deploy/kustomization.yaml: images[mailfront].newName and newTag;
- deploy/compose.yaml: the default of ${MAILFRONT_IMAGE}.

It fails when a placeholder is left over in those files, or when a line it must change is gone.
"""

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def sub(path, pattern, repl, text):
    new, n = re.subn(pattern, repl, text, flags=re.M)
    if n == 0:
        sys.exit(f"stamp-release: {path}: no line matches {pattern!r}")
    return new


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repository", required=True, help="https://github.com/OWNER/REPO")
    p.add_argument("--image", required=True, help="ghcr.io/owner/mailfront (lowercase)")
    p.add_argument("--version", required=True, help="the release, e.g. 1.2.3 (no v)")
    p.add_argument("--root", default=str(ROOT), help="the checkout to stamp (default: this one)")
    a = p.parse_args()
    if not re.fullmatch(r"https://github\.com/[^/\s]+/[^/\s]+", a.repository):
        sys.exit(f"stamp-release: --repository {a.repository!r} is not https://github.com/OWNER/REPO")
    if not re.fullmatch(r"[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+", a.image):
        sys.exit(f"stamp-release: --image {a.image!r} must be a lowercase repository without tag")
    if not re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?", a.version):
        sys.exit(f"stamp-release: --version {a.version!r} is not SemVer")
    root = pathlib.Path(a.root)

    chart = root / "helm/mailfront/Chart.yaml"
    t = chart.read_text()
    t = sub(chart, r"^home: .*$", f"home: {a.repository}", t)
    t = sub(chart, r"^sources:\n  - .*$", f"sources:\n  - {a.repository}", t)
    t = sub(chart, r"^(  mailfront/image: ).*$", rf"\g<1>{a.image}", t)
    t = sub(chart, r"^appVersion: .*$", f'appVersion: "{a.version}"', t)
    chart.write_text(t)

    kust = root / "deploy/kustomization.yaml"
    t = kust.read_text()
    t = sub(kust, r"^(    newName: ).*$", rf"\g<1>{a.image}", t)
    t = sub(kust, r"^(    newTag: ).*$", rf'\g<1>"{a.version}"', t)
    kust.write_text(t)

    compose = root / "deploy/compose.yaml"
    t = compose.read_text()
    t = sub(compose, r"\$\{MAILFRONT_IMAGE:-[^}]*\}", f"${{MAILFRONT_IMAGE:-{a.image}:{a.version}}}", t)
    compose.write_text(t)

    left = [str(f.relative_to(root)) for f in (chart, kust, compose)
            if re.search(r"(ghcr\.io|github\.com)/example/", f.read_text())]
    if left:
        sys.exit(f"stamp-release: placeholders left in {left}")
    print(f"stamped {a.image}:{a.version} from {a.repository}")


if __name__ == "__main__":
    main()
