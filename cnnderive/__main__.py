import sys

from cnnderive.cli import main

sys.exit(main())
