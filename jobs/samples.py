"""Sample photos for a first run: copies scikit-image's bundled photos (no download) into a folder,
one sub-folder per rough label.

    python -m bulk_explain.jobs.samples sample_photos/
"""

from __future__ import annotations

import os
import shutil
import sys

SAMPLES = {
    "animals": ["chelsea.png", "astronaut.png"],
    "objects": ["coffee.png", "rocket.jpg", "camera.png", "coins.png"],
    "scenes": ["hubble_deep_field.jpg", "retina.jpg", "horse.png", "text.png"],
}


def copy_samples(dest: str) -> int:
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("scikit-image is needed for the sample photos: pip install -e '.[samples]'")
    src = os.path.dirname(skimage.data.__file__)
    count = 0
    for label, names in SAMPLES.items():
        os.makedirs(os.path.join(dest, label), exist_ok=True)
        for name in names:
            if os.path.exists(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(dest, label, name))
                count += 1
    return count


if __name__ == "__main__":
    dest = sys.argv[1] if len(sys.argv) > 1 else "sample_photos"
    print(f"copied {copy_samples(dest)} sample photos into {dest}")
