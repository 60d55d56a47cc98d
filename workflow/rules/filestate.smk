# Modification times that survive `dvc pull`, `dvc checkout` and `git clone` (negmargin.filestate).
# After every successful run the manifest <results>/mtimes.json (one per named config) records size, time and
# SHA-256 of each file under data/, results/ and resources/; before the DAG is built, every file whose content
# matches gets its recorded time back. Jobs started by a remote executor (Slurm) skip this.

from negmargin import filestate

if config["restore_mtimes"] and not workflow.remote_exec:
    filestate.restore_and_report(os.getcwd(), P.paths.manifest)


onsuccess:
    if not workflow.remote_exec:
        filestate.record(os.getcwd(), P.paths.manifest)
