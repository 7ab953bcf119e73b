"""The README's fenced ```python blocks run verbatim against a small real output.

Every block is compiled. Blocks are executed in a fresh namespace with the working directory holding
`out/` (a finished run), except, each with the reason recorded in the test's skip list:
- a block that needs ImageNet weights (a network download; tests never download them),
- a block that imports a module not installed here (duckdb, pandas: optional reading extras).
The S3 block runs against the moto S3 server with the output's manifest uploaded to the bucket and
prefix the README names.
"""

import importlib.util
import os
import re
import textwrap

import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import REPO, photo_like, write_image

FENCE = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.S | re.M)
README_S3_PREFIX = ("audits", "pets/2026-11-25/manifest")


def readme_blocks():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return [textwrap.dedent(m.group(2)) for m in FENCE.finditer(text)]


def _skip_reason(block):
    if '"imagenet"' in block:
        return "needs ImageNet weights (network download)"
    for module in re.findall(r"^\s*import (\w+)|^\s*from (\w+)", block, re.M):
        name = module[0] or module[1]
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
    if "pip install pandas" in block and importlib.util.find_spec("pandas") is None:
        return "pandas is not installed"
    return None


@pytest.fixture(scope="module")
def small_output(tmp_path_factory):  # run_explain starts its own embedded Ray (ray_local is per test)
    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain

    root = tmp_path_factory.mktemp("readme")
    rng = np.random.default_rng(5)
    for label in ("cats", "dogs"):
        for i in range(2):
            write_image(str(root / "photos" / label / f"{i}.jpg"), photo_like(rng, 40, 56))
    result = run_explain(ExplainConfig(inputs=(str(root / "photos"),), output=str(root / "out"),
                                       model=ModelSpec("cats_dogs", weights="random", input_size=64),
                                       batch_size=4, shard_size=2, workers=1), progress=False)
    assert result.exit_code == 0 and result.ok == 4
    return root


def test_readme_has_the_python_blocks_we_run():
    blocks = readme_blocks()
    assert any("ds.dataset(\"out/manifest\")" in b for b in blocks)
    assert any("storage_for(uri).filesystem(uri)" in b for b in blocks)
    for block in blocks:
        compile(block, "README.md", "exec")


def test_readme_python_blocks_run(small_output, s3_endpoint, s3_client, monkeypatch):  # s3_endpoint: AWS_ENDPOINT_URL_S3 as a user sets it
    bucket, prefix = README_S3_PREFIX
    try:
        s3_client.create_bucket(Bucket=bucket)
    except s3_client.exceptions.BucketAlreadyOwnedByYou:
        pass
    parts = sorted((small_output / "out" / "manifest").glob("*.parquet"))
    for part in parts:
        s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{part.name}", Body=part.read_bytes())
    monkeypatch.chdir(small_output)
    ran, skipped = [], []
    for block in readme_blocks():
        reason = _skip_reason(block)
        if reason:
            skipped.append(reason)
            continue
        namespace = {"__name__": "readme"}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
        ran.append(namespace)
    # The local pyarrow block and the S3 block must have run, with the rows of the output.
    local = [ns for ns in ran if "df" in ns]
    s3 = [ns for ns in ran if "fs" in ns]
    assert local and s3, skipped
    assert len(local[0]["table"]) == len(s3[0]["table"]) == 4
    assert "correct" in local[0]["table"].column_names
    print("README blocks run:", len(ran), "skipped:", skipped)
