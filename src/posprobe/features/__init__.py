"""Images to features, computed once: a frozen backbone's levels aligned to one grid and kept as channel parts
(``parts``), encoded in batches (``encode``), kept on disk by content (``cache``) or re-encoded on every pass
when too large to keep (``sources``)."""
