"""Pretrain the embedded default model and write it into the package (gist_demo/default_model/).

The package ships this model so that `make demo` and a new storage root do not pretrain it again
(about 70 s on a laptop CPU). base_model uses it only when its key (the settings, the pretraining
corpus and the training code: gist_demo.tiny_model.embedded_model_key) is the one base_model asks
for; otherwise it pretrains. Run this after changing any of those, and commit the result
(tests/test_input_assets.py fails while the shipped model is out of date):

    make default-model
"""

from __future__ import annotations

import argparse
import sys

from gist_assets.config import BaseModelConfig
from gist_assets.model import embedded_model_settings
from gist_demo import tiny_model
from gist_resources import ArtifactStore


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    spec, settings = embedded_model_settings(BaseModelConfig())
    key = tiny_model.embedded_model_key(spec, *settings)
    if tiny_model.shipped_model(key) is not None:
        print(f"{tiny_model.SHIPPED_MODEL_DIR} is already the default model {key}")
        return 0
    built = tiny_model.build_embedded_model(spec, *settings)
    ArtifactStore.write_embedded_model(tiny_model.SHIPPED_MODEL_DIR, built)
    print(f"wrote the default model {key} to {tiny_model.SHIPPED_MODEL_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
