"""Thin adapters from MONAI Bundle and MONAI Label onto the pipeline; the core never imports them.

* :mod:`monai_medplib.adapters.bundle`: the ``_target_`` s of ``bundle/configs/*.json`` (prompts, one-study
  runner, cohorts, evaluator);
* :mod:`monai_medplib.adapters.monailabel`: the ``medplib serve`` launcher, its server hardening and the
  pydicom 3 compatibility hook.

Importing this package imports nothing else: the interpreter-start hook in ``scripts/install.sh`` goes through it.
"""
