"""The build's one part that pyproject.toml cannot say: the fast loader's copy loop in C
(ramstage/fastload/copyloop.c, loaded with ctypes by ramstage/fastload/native.py). It is built
where a C compiler is at hand; without one, or with RAMSTAGE_NO_COPYLOOP set (the .deb and
.rpm, which are architecture-independent), ramstage installs without it and the fast loader
copies with its Python loop."""

import os

from setuptools import Extension, setup

copy_loop = Extension(
    "ramstage.fastload._copyloop",
    ["ramstage/fastload/copyloop.c"],
    extra_compile_args=["-O2"],
    optional=True,
)
setup(ext_modules=[] if os.environ.get("RAMSTAGE_NO_COPYLOOP") else [copy_loop])
