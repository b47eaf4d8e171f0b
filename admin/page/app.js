document.getElementById('app').textContent='placeholder page; see /stats';
