from adaptive_moe.cli import main

raise SystemExit(main())
