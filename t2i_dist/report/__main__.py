import sys

from t2i_dist.report.cli import main

sys.exit(main())
