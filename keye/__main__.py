import sys

from keye.cli import main

sys.exit(main())
