"""What a job leaves behind, read and drawn: the run report, plan pictures, pipeline timelines, the hang doctor.

Reads the job's record (``$ONEGPU_HOME/jobs/<job>``) and Plans; never runs a job. Above ``launch``, ``pool`` and
``planner``; beside ``runtime``, which writes the records and never imports this package.
"""
