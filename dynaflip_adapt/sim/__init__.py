"""A MuJoCo tabletop simulator that writes site logs (extra ``sim``: ``pip install
dynaflip-adapt[sim]``).

MuJoCo picks its OpenGL backend when it is first imported, so ``MUJOCO_GL`` is set here, before
any submodule imports mujoco: EGL renders offscreen with no display. Set ``MUJOCO_GL=osmesa`` to
use software rendering instead.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
