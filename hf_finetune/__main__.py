from hf_finetune.cli import main

raise SystemExit(main())
