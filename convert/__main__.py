import sys

from xenstream.convert.cli import main

sys.exit(main())
