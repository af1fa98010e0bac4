"""Serving: the DICOM gateway (SCP, spool, job store, SEG/SR writers). Never imports torch.

Built by the gateway issue; until then this package holds nothing.
"""
