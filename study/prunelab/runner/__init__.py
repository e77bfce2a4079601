"""The runner stage: a study file, its variants, chunks of work, the resumable work folder and the run
driver that hands every variant x task pair to an executor (this process or a Ray cluster).

``load_study`` and ``run_study`` are the entry points; the submodules hold the rest.
"""

from prunelab.runner.run import run_study
from prunelab.runner.session import Reporter
from prunelab.runner.studyfile import Study, load_study

__all__ = ["Reporter", "Study", "load_study", "run_study"]
