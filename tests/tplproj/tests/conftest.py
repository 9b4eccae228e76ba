import os

os.environ["TPLPROJ_ENVIRONMENT"] = "pytest"
