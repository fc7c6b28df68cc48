import sys

from t2r.cli import main

sys.exit(main())
