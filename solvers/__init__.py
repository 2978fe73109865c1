"""Diffusion ODE/SDE solvers in JAX: schedules, predictions, grids, solvers and the one sampling loop."""
from solvers import base, grids, predictions, schedules
from solvers import ddim, dpm_solver_multistep, unipc  # noqa: F401  (register their solvers)
from solvers import dpm_solver_adaptive, dpm_solver_singlestep  # noqa: F401  (register the singlestep and adaptive DPM-Solvers)
from solvers import deis  # noqa: F401  (registers the DEIS solvers)
from solvers import pndm  # noqa: F401  (registers pndm_s, pndm_f, plms)
from solvers import dpm_solver_v3  # noqa: F401  (registers DPM-Solver-v3)
from solvers import dc_solver  # noqa: F401  (registers dc_solver)
from solvers import edm  # noqa: F401  (registers edm_euler, edm_heun, edm_heun_churn)
from solvers import time_shift  # noqa: F401  (registers ts_ddim, ts_dpm_solver_pp_2m)
from solvers import teleportation  # noqa: F401  (registers teleport_dpm_solver_pp_2m)
from solvers import dpm_solver_sde, euler_maruyama, langevin  # noqa: F401  (register the SDE samplers, ddpm_ancestral, the Langevin corrector)
from solvers import ghvb, heavy_ball  # noqa: F401  (register ghvb_2, ghvb_4, plms_hb, dpm_solver_pp_2m_hb)
from solvers import lml  # noqa: F401  (registers ddim_lml, the Levenberg-Marquardt-Langevin plug-in)
from solvers import bdia, edict  # noqa: F401  (register bdia_ddim, bdia_edm, edict)
from solvers import usf  # noqa: F401  (registers usf, the per-step solver schedule)
from solvers.base import available, get, register
from solvers.grids import Grid
from solvers.predictions import Denoiser, Guided, Thresholded
from solvers.loop import Solution, sample

__all__ = ["available", "get", "register", "sample", "Solution", "Grid", "Denoiser", "Guided",
           "Thresholded", "base", "grids", "predictions", "schedules"]
