"""The MONAI Label side: the ``medplib serve`` launcher (:mod:`.server`, :mod:`.launch`), the hardening it and the
app apply (:mod:`.hardening`: :mod:`.guard`, :mod:`.infer`, :mod:`.routes`, :mod:`.auth`, :mod:`.datastore`,
:mod:`.uploads`, :mod:`.archives`, :mod:`.names`, :mod:`.errors`, :mod:`.settings`) and the pydicom 3 compatibility
hook (:mod:`.pydicom_compat`). Imports nothing, so the interpreter-start hook stays cheap."""
