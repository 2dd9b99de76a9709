"""The serving sweep's reference row and targets, shared by the sweep, its report and its plots."""

REFERENCE = "ar"  # speedups are over this row
# issue 10's targets: adasd at 8 clients >= 3x adasd at 1; adasd >= 1.2x ar at 1-8 clients and never below
# ar above 8 (16); adasd at 1 client no slower than a baseline run (--baseline)
SCALING_GOAL = 3.0
VS_AR_GOAL = {"up_to_8": 1.2, "above_8": 1.0}
BASELINE_GOAL = 1.0
