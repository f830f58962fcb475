"""retina: find the best way to train a retinal vessel segmentation U-Net.

The package follows the pipeline: ``data`` (fundus photos, vessel labels, field-of-view
masks, splits), ``model``, ``training``, ``metrics``, ``sweep`` (Ray Tune), ``tracking``
(MLflow), ``selection`` (choosing and evaluating the best run) and ``cli``.
"""

__version__ = "0.1.0"
