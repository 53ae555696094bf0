"""``python -m lit {fit,validate,test,predict}``: the project's LightningCLI."""

from lit.cli import main

if __name__ == "__main__":
    main()
