import sys

from KDSegmentationLib.cli.main import main

sys.exit(main())
