import sys

from relay_ray.cli import main

sys.exit(main())
