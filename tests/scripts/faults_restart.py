"""A script that fails on every attempt: a job that uses up its --max-restarts. faults_restart.py TAG"""

import sys

sys.exit("no luck")
