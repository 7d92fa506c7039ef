"""The MONAI Label side: the ``medplib serve`` launcher and its hardening (:mod:`.server`) and the pydicom 3
compatibility hook (:mod:`.pydicom_compat`). Imports nothing, so the interpreter-start hook stays cheap."""
