"""ICH Watch DICOM node: `python -m dicom_listener` accepts C-ECHO and C-STORE and queues CT
slices for scoring. It never decodes pixels and never imports TensorFlow."""
