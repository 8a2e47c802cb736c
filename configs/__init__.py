"""Named configs: `python train.py --config NAME` loads configs/NAME.py's get_config()."""
