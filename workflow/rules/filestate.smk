# Modification times that survive `dvc pull`, `dvc checkout` and `git clone` (negmargin.filestate).
# After every successful run the manifest results/mtimes.json records size, time and SHA-256 of each file
# under data/, results/ and resources/; before the DAG is built, every file whose content matches gets its recorded
# time back. Jobs started by a remote executor (Slurm) skip this: the main Snakemake process did it.

sys.path.insert(0, str(PACKAGE_SRC))
from negmargin import filestate


def restore_file_times():
    if not config.get("restore_mtimes", True) or workflow.remote_exec:
        return
    restored, differing = filestate.restore(os.getcwd())
    if restored or differing:
        print(
            f"{filestate.MANIFEST}: restored the recorded modification time of {restored} file(s) whose"
            f" content is unchanged; {differing} file(s) differ from the record and keep their new time.",
            file=sys.stderr,
        )


onsuccess:
    if not workflow.remote_exec:
        filestate.record(os.getcwd())
